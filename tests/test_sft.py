"""Supervised fine-tuning: demonstrations read in both layouts with every bad row named, the loss on reply
tokens only (hand values), and a fine-tuned policy that `model.path` takes."""

import json
import math

import pytest
import torch

from cluster.models import prepare_tiny
from core.config import SFTConfig
from core.demonstrations import DemonstrationError, load_demonstrations
from learner.sft import SFTTrainer, encode, run_sft, sft_loss

NAN = float("nan")


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(prepare_tiny())


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_both_layouts_are_read_and_every_bad_row_is_named(tmp_path):
    columns = write(tmp_path / "columns.jsonl", [
        {"prompt": "My bus was late.", "response": "A calm moment to breathe."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I lost my keys."}],
         "response": "Time for a walk while they turn up."}])
    demos, skipped = load_demonstrations(columns, SFTConfig())
    assert [d.row for d in demos] == [0, 1] and not skipped
    assert demos[1].prompt[0] == {"role": "system", "content": "Be kind."}

    dialogues = write(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "user", "content": "It rained."}, {"role": "assistant", "content": "Puddles!"}]}])
    (demo,), _ = load_demonstrations(dialogues, SFTConfig())
    assert demo.prompt == [{"role": "user", "content": "It rained."}] and demo.response == "Puddles!"

    bad = write(tmp_path / "bad.jsonl", [
        {"prompt": "fine", "response": "fine too"},
        {"prompt": "no reply", "response": ""},
        {"prompt": "", "response": "no request"},
        {"prompt": "missing", "response": None}])
    with pytest.raises(DemonstrationError, match=r"bad.jsonl: 3 of 4 rows are unusable:\n  row 1: response is empty\n"
                                                 r"  row 2: prompt is empty\n  row 3: response is missing\n"
                                                 r"Fix these rows, or set sft.on_bad_row=skip"):
        load_demonstrations(bad, SFTConfig())
    demos, skipped = load_demonstrations(bad, SFTConfig(on_bad_row="skip"))
    assert [d.row for d in demos] == [0] and len(skipped) == 3

    last_turn = write(tmp_path / "user-last.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(DemonstrationError, match="row 0: messages do not end with the assistant's reply"):
        load_demonstrations(last_turn, SFTConfig())
    with pytest.raises(DemonstrationError, match=r"has neither a 'messages' column nor both 'prompt' and 'response'"):
        load_demonstrations(write(tmp_path / "other.jsonl", [{"text": "hi"}]), SFTConfig())


def test_the_loss_is_the_mean_nll_of_reply_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, NAN], [-4.0, NAN, NAN]])  # replies of 2 and 1 tokens, NaN padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logprobs, mask).item() == pytest.approx((1 + 2 + 4) / 3)


def test_the_trainer_scores_reply_tokens_after_their_prompt_and_ignores_the_rest(tiny):
    trainer = SFTTrainer(tiny, SFTConfig(autocast="none", threads=1))
    examples = [([5, 6, 7, 8], [9, 10, 2]), ([11, 12], [13, 2])]

    def by_hand(prompt, reply):  # log-softmax of an unpadded forward, at the positions that predict the reply
        with torch.no_grad():
            logits = trainer.model(torch.tensor([prompt + reply])).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)
        return [logprobs[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(reply)]

    with torch.no_grad():
        loss, tokens = trainer.nll(examples)
    expected = [lp for p, r in examples for lp in by_hand(p, r)]
    assert tokens == 5
    assert loss.item() == pytest.approx(-sum(expected) / 5, abs=1e-5)


def test_sft_learns_the_demonstrations_and_writes_a_policy_directory(tiny, tmp_path):
    reply = "Every setback is a chance to grow."
    rows = [{"prompt": f"Setback number {i} happened today.", "response": reply} for i in range(24)]
    rows.append({"prompt": "Too long?", "response": " ".join(["word"] * 300)})
    cfg = SFTConfig(path=write(tmp_path / "demos.jsonl", rows), output_dir=str(tmp_path / "sft"), lr=1e-3,
                    epochs=2, batch_size=4, autocast="none", threads=1, eval_fraction=0.25)
    with pytest.raises(DemonstrationError, match=r"row 24: \d+ prompt \+ \d+ reply tokens, over sft.max_length = 256"):
        run_sft(tiny, cfg)
    cfg.on_bad_row = "skip"
    path, history = run_sft(tiny, cfg)
    assert history[-1]["eval/loss"] < history[0]["eval/loss"] - 1.0  # held-out prompts, the same reply
    assert history[-1]["eval/perplexity"] == pytest.approx(math.exp(history[-1]["eval/loss"]))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    (example,) = encode(load_demonstrations(cfg.path, cfg)[0][:1], tokenizer, 256, cfg.path)
    base = SFTTrainer(tiny, SFTConfig(autocast="none", threads=1))
    with torch.no_grad():
        before = base.nll([example])[0].item()
        base.model = tuned
        after = base.nll([example])[0].item()
    assert after < before - 1.0
