"""The pipeline's commands end to end with the tiny model and real vLLM: `rlhf make-demos` keeps the gold-best
sample per prompt, `rlhf sft` trains on them, and a PPO job with PPO-ptx starts from the result; `rlhf dpo`
trains on preference pairs and judges the base and the result with the gold scorer; `rlhf elo` rates the
SFT policy against the base, and a job rates its own evaluations."""

import json

import pytest

from cluster.cli import main
from tests.helpers import TINY, run

pytestmark = pytest.mark.ray


def test_demos_from_the_policy_train_an_sft_model_that_ppo_starts_from(ray_session, tmp_path, capsys):
    demos = tmp_path / "demos.jsonl"
    # written to <sft.output_dir>/demos.jsonl
    assert main(["make-demos", "--config", str(TINY), f"sft.output_dir={tmp_path}", "sft.num_demos=6",
                 "sft.demo_samples=3"]) == 0
    rows = [json.loads(line) for line in demos.read_text().splitlines()]
    assert len(rows) == 6 and all(r["prompt"] and "response" in r for r in rows)
    assert all(r["gold"] >= r["group_gold_mean"] for r in rows)  # the best of its group
    assert "demonstrations" in capsys.readouterr().out

    out = tmp_path / "sft"
    assert main(["sft", "--config", str(TINY), f"sft.path={demos}", f"sft.output_dir={out}", "sft.epochs=1",
                 "sft.eval_fraction=0.34", "sft.threads=1"]) == 0
    printed = capsys.readouterr().out
    assert f"train from it with model.path={out}" in printed and "held-out gold reward (vader):" in printed
    # PPO from the SFT model, with PPO-ptx on the demonstrations, their perplexity at each evaluation, and
    # each evaluation's policy rated against the earlier ones
    summary, steps = run(tmp_path / "ppo", f"model.path={out}", "train.steps=1", "ppo.ptx_coef=0.5",
                         f"ppo.ptx_path={demos}", f"train.eval_demos={demos}", "train.elo=true")
    assert summary["policy_version"] == 1
    assert steps[1]["loss/ptx"] > 0 and summary["eval/demo_perplexity_after"] > 1
    assert steps[0]["eval/elo"] == 1000.0 and "eval/elo" in steps[-1]
    assert (tmp_path / "ppo" / "elo" / "ratings.png").stat().st_size > 1000

    # the SFT policy against the base, judged by the gold scorer
    elo = tmp_path / "elo"
    assert main(["elo", "--config", str(TINY), "--player", f"sft={out}", "elo.num_prompts=6", "elo.bootstrap=20",
                 f"elo.output_dir={elo}"]) == 0
    ratings = json.loads((elo / "ratings.json").read_text())
    assert [p["name"] for p in ratings["players"]] == ["base", "sft"] and ratings["matches"] == 6
    assert ratings["players"][0]["rating"] == 1000.0 and (elo / "ratings.png").is_file()
    assert "win rate (row against column)" in capsys.readouterr().out


def test_sft_without_demonstrations_says_what_to_give(capsys):
    assert main(["sft", "--config", str(TINY)]) == 2
    assert "sft.path is empty: give a demonstration file" in capsys.readouterr().err


def test_dpo_trains_on_each_prompts_best_reply_against_its_worst_and_reports_gold_and_kl(ray_session, tmp_path,
                                                                                          capsys):
    import math
    import re

    scored = tmp_path / "scored.jsonl"  # scored replies, as a job's kept rollouts hold them
    scored.write_text("".join(json.dumps({"prompt": f"My plan {i} fell through.", "response": reply,
                                          "reward": reward}) + "\n"
                              for i in range(12) for reply, reward in [("A lovely surprise!", 0.8),
                                                                       ("Terrible and sad.", -0.6), ("Okay.", 0.1)]))
    out = tmp_path / "dpo"
    assert main(["dpo", "--config", str(TINY), f"preferences.path={scored}", "preferences.form=scored",
                 f"dpo.output_dir={out}", "dpo.threads=1", "dpo.batch_size=4", "preferences.eval_fraction=0.25"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: held-out loss" in printed and "implicit-reward accuracy" in printed
    assert "held-out gold reward (vader):" in printed and f"model.path={out}" in printed
    assert math.isfinite(float(re.search(r"after DPO, KL to the starting policy (\S+)", printed)[1]))
    assert (out / "config.json").is_file()
