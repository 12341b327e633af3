"""DPO: the loss by hand, the reference computed by the reference model so that training starts at log 2,
and a policy that learns the preferred replies."""

import math

import pytest
import torch

from actors.reference import ReferenceModel
from cluster.models import prepare_tiny
from core.config import DPOConfig, ReferenceConfig
from core.preferences import PreferenceDataError, PreferencePair
from learner.dpo import DPOTrainer, dpo_loss, encode_pairs, with_reference


def test_dpo_loss_by_hand():
    loss, stats = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                           torch.tensor([-1.5, -2.0]), beta=0.5)
    # implicit rewards: chosen 0.5 * (0.5, -1) = (0.25, -0.5); rejected 0.5 * (-0.5, 1) = (-0.25, 0.5)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx((0.5 - 1.0) / 2)
    assert stats["chosen_reward"].item() == pytest.approx(-0.125)
    assert stats["rejected_reward"].item() == pytest.approx(0.125)


def test_dpo_starts_at_log_2_and_learns_the_preferred_replies(tmp_path):
    tiny = str(prepare_tiny())
    pairs = [PreferencePair(prompt=f"Setback {i} happened.", chosen="What a lovely chance to grow!",
                            rejected="That is awful and sad.", row=i) for i in range(20)]
    cfg = DPOConfig(lr=1e-3, epochs=2, batch_size=4, autocast="none", threads=1, beta=0.1)
    trainer = DPOTrainer(tiny, cfg)
    reference = ReferenceModel(tiny, ReferenceConfig(threads=1), dtype="float32", autocast="none")
    train, held = (with_reference(encode_pairs(p, trainer.tokenizer, 256, "pairs"), reference)
                   for p in (pairs[:16], pairs[16:]))
    history = trainer.train(train, held)
    assert history[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert history[0]["eval/margin"] == pytest.approx(0.0, abs=1e-3)
    assert history[-1]["eval/accuracy"] == 1.0 and history[-1]["eval/margin"] > 0.5
    assert history[-1]["eval/loss"] < history[0]["eval/loss"] - 0.2
    assert "train/accuracy" in history[-1]

    long = [PreferencePair(prompt="Hi", chosen="ok", rejected=" ".join(["no"] * 300), row=7)]
    with pytest.raises(PreferenceDataError, match=r"row 7: \d+ prompt \+ \d+ reply tokens, over dpo.max_length = "
                                                  r"256\nFix these rows, or set preferences.on_bad_row=skip"):
        encode_pairs(long, trainer.tokenizer, 256, "pairs.jsonl")
    assert encode_pairs(long, trainer.tokenizer, 256, "pairs.jsonl", on_bad_row="skip") == []


def test_a_reply_cut_off_at_the_length_limit_gets_no_eos_from_the_pair_file_to_the_encoding(tmp_path):
    """make-preferences writes whether each reply finished; a cut reply did not end, so DPO must not teach
    the policy to stop there. A flipped pair swaps the flags with the replies."""
    from transformers import AutoTokenizer

    from cluster.pipeline import flip_labels
    from core.preferences import load_preferences, write_preferences

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_tiny()))
    pairs = [PreferencePair("Rain again.", "A cosy day in!", "It rains and rains and", rejected_finished=False),
             PreferencePair("Late bus.", "More time to read.", "Sad.")]
    extra = [{"chosen_score": 1.0, "rejected_score": 0.0, "flipped": False, "chosen_finished": True,
              "rejected_finished": False}, {"chosen_score": 1.0, "rejected_score": 0.0, "flipped": False}]
    flip_labels(pairs, extra, 0.5, seed=1)
    assert extra[0]["flipped"] and (extra[0]["chosen_finished"], extra[0]["rejected_finished"]) == (False, True)
    write_preferences(tmp_path / "pairs.jsonl", pairs, extra)
    loaded = load_preferences(str(tmp_path / "pairs.jsonl")).pairs
    assert (loaded[0].chosen, loaded[0].chosen_finished, loaded[0].rejected_finished) == \
        ("It rains and rains and", False, True)
    (_, cut, whole), (_, chosen, rejected) = encode_pairs(loaded, tokenizer, 256, "pairs.jsonl")
    eos = tokenizer.eos_token_id
    assert cut[-1] != eos and whole[-1] == eos and chosen[-1] == eos and rejected[-1] == eos
