"""Reward-model training: the Bradley-Terry loss by hand, training on the tiny model to high held-out
accuracy on a separable toy set, and the saved model scored identically by the scorer and the server."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from cluster.models import prepare_tiny
from core.config import RewardConfig, build_config
from core.preferences import PreferencePair
from learner.distributed import free_port
from learner.reward_model import RewardModelTrainer, bradley_terry_loss, pair_accuracy
from reward_server.scorers import RewardModelScorer, encode_conversations, response_mask

WORDS = "the a train bus day morning shop coffee rain friend walk phone keys queue ticket window".split()


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -(log sigmoid(1) + log sigmoid(0)) / 2 = (0.31326 + 0.69315) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.503204, abs=1e-6)
    # a confidently wrong pair costs its margin, and stays finite
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)
    assert bradley_terry_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() == pytest.approx(0.0, abs=1e-30)


def test_bradley_terry_gradient_pushes_the_pair_apart():
    chosen, rejected = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dc -log sigmoid(c - r) = -(1 - sigmoid(0)) = -0.5
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_pair_accuracy_counts_ties_as_wrong():
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, 3.0, 0.1])) == 0.5


def toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Separable preferences: the chosen reply ends "... great", the rejected one "... awful"."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        pairs.append(PreferencePair(prompt=f"Tell me about {rng.choice(WORDS)} number {i}.",
                                    chosen=f"{filler} great", rejected=f"{filler} awful"))
    return pairs


# the default head, and the mean-pooled one on a reward model cut to the lowest block of two
@pytest.fixture(scope="module", params=[[], ["rm.pooling=mean", "rm.num_layers=1"]], ids=["last", "mean"])
def trained(tmp_path_factory, request):
    cfg = build_config({}, ["rm.autocast=none", "rm.threads=1", "rm.lr=1e-3", "rm.head_lr=1e-2",
                            "rm.epochs=2", "rm.batch_size=8", *request.param]).rm
    trainer = RewardModelTrainer(prepare_tiny(), cfg)
    before = trainer.evaluate(toy_pairs(32, seed=1))
    history = trainer.train(toy_pairs(64, seed=0), toy_pairs(32, seed=1))
    path = trainer.save(str(tmp_path_factory.mktemp("rm") / "model"))
    return trainer, [before] + history, path


def test_training_on_the_tiny_model_separates_a_toy_preference_set(trained):
    _, (before, *history), _ = trained
    assert len(history) == 2
    # a fresh head is near zero everywhere: held-out loss about log 2, no margin yet
    assert before["eval/loss"] > 0.5 and abs(before["eval/margin"]) < 0.5
    assert history[-1]["eval/accuracy"] >= 0.95 and history[-1]["eval/loss"] < 0.1


def test_the_saved_model_scores_as_the_trainer_does(trained):
    trainer, _, path = trained
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["reward_pooling"] == trainer.cfg.pooling
    assert config["num_hidden_layers"] == (trainer.cfg.num_layers or 2)
    pairs = toy_pairs(6, seed=2)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    scorer = RewardModelScorer(path)
    with torch.no_grad():
        trainer.model.eval()
        expected = trainer.rewards(prompts, responses).tolist()
    assert scorer.score(prompts, responses) == pytest.approx(expected, abs=1e-5)


@pytest.mark.ray
def test_the_reward_server_serves_the_trained_model_unchanged(trained, ray_session):
    import httpx
    from ray import serve

    from reward_server.server import reward_url, start_reward_server

    _, _, path = trained
    pairs = toy_pairs(5, seed=3)
    prompts, responses = [p.prompt for p in pairs], [p.rejected for p in pairs]
    direct = RewardModelScorer(path).score(prompts, responses)
    cfg = RewardConfig(scorer=f"model:{path}", port=free_port())
    handle = start_reward_server(cfg)
    try:
        served = handle.score.remote(prompts, responses).result()
        reply = httpx.post(reward_url(cfg), json=[{"prompt": p, "response": r} for p, r in zip(prompts, responses)],
                           timeout=60)
    finally:
        serve.shutdown()
    assert served == pytest.approx(direct, abs=1e-5)
    assert reply.status_code == 200 and reply.json()["rewards"] == pytest.approx(direct, abs=1e-5)
    assert all(math.isfinite(r) for r in served)


def test_response_mask_marks_exactly_the_reply_and_its_end_of_turn():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_tiny())
    tokenizer.padding_side = "right"
    dialogue = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "My train was late."}]
    prompts, responses = ["My bus was late.", dialogue], ["A quiet hour to read.", "More time for coffee"]
    batch = encode_conversations(tokenizer, prompts, responses, 256)
    mask = response_mask(tokenizer, prompts, batch["attention_mask"])
    for i, response in enumerate(responses):
        reply = batch["input_ids"][i][mask[i].bool()]
        assert tokenizer.decode(reply) == response + "<|im_end|>\n"
    with pytest.raises(ValueError, match="no response token left"):
        response_mask(tokenizer, prompts, encode_conversations(tokenizer, prompts, responses, 20)["attention_mask"])


def test_rm_depth_beyond_the_base_is_refused():
    cfg = build_config({}, ["rm.num_layers=3", "rm.autocast=none"]).rm
    with pytest.raises(ValueError, match="rm.num_layers = 3 but .* has 2 blocks"):
        RewardModelTrainer(prepare_tiny(), cfg)


def test_train_rm_without_preference_data_says_what_to_do(capsys):
    assert main(["train-rm"]) == 2
    assert "rlhf make-preferences" in capsys.readouterr().err


def test_train_rm_lists_bad_rows_by_number(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": "a", "rejected": "b"}]) + "\n")
    assert main(["train-rm", f"preferences.path={bad}"]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "row 2" in err and "on_bad_row=skip" in err and "Traceback" not in err
