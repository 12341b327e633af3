"""The reward-modeling jobs on Ray with the tiny model and real vLLM: a gold-labelled preference set from
the workers, a reward model trained on it, PPO against it, a West-of-N round, and Best-of-N under the
reward server."""

import json
import math

import pytest

from cluster.cli import main
from cluster.commands.best_of_n import best_of_n
from cluster.commands.train_rm import train_rm
from cluster.commands.west_of_n import west_of_n
from cluster.job import train
from core.config import load_config
from core.preferences import load_preferences
from core.rollout_records import load_scored
from learner.distributed import free_port
from tests.helpers import TINY


def tiny_args(*overrides):
    return ["--config", str(TINY), "generation.num_workers=1", f"reward.port={free_port()}", *overrides]

pytestmark = pytest.mark.ray


def tiny(tmp_path, *overrides):
    return load_config(TINY, ["generation.num_workers=1", f"reward.port={free_port()}", "rm.epochs=1",
                              f"rm.output_dir={tmp_path / 'rm'}", f"west_of_n.output_dir={tmp_path / 'won'}",
                              *overrides])


def test_preferences_reward_model_and_west_of_n_from_the_workers(ray_session, tmp_path):
    # as a user runs it: the pairs go to <preferences.output_dir>/pairs.jsonl
    assert main(["make-preferences", *tiny_args("preferences.num_pairs=10", "preferences.flip_fraction=0.2",
                                                f"preferences.output_dir={tmp_path}", "preferences.keep_rollouts=true")
                 ]) == 0
    pairs_file = str(tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in open(pairs_file)]
    assert len(rows) == 10 and sum(r["flipped"] for r in rows) == 2
    for r in rows:  # the labeller's preference, except where flipped on purpose
        assert (r["chosen_score"] >= r["rejected_score"]) != r["flipped"] and r["chosen"] != r["rejected"]
    assert len(load_preferences(pairs_file).pairs) == 10
    # every labelled reply kept with its unflipped score, ties included, readable as scored replies
    replies, _ = load_scored(str(tmp_path / "rollouts"), ("prompt", "response", "reward"), None, "error", "x")
    scored = {(r.prompt, r.response): r.reward for r in replies}
    assert len(replies) >= 20 and len(replies) % 2 == 0
    for r in rows:
        assert {scored[(r["prompt"], r["chosen"])], scored[(r["prompt"], r["rejected"])]} == {
            r["chosen_score"], r["rejected_score"]}

    cfg = tiny(tmp_path, f"preferences.path={pairs_file}", "preferences.eval_fraction=0.3",
               "west_of_n.num_prompts=6", "west_of_n.n=3", "west_of_n.quantile=0.5", "west_of_n.min_logprob=-.inf")
    final = train_rm(cfg)
    assert (tmp_path / "rm" / "config.json").exists() and 0.0 <= final["eval/accuracy"] <= 1.0

    # PPO against the learned reward model: the server serves it, and the held-out evaluation reports
    # the gold scorer beside the proxy, so over-optimisation would show
    summary = train(tiny(tmp_path, f"reward.scorer=model:{tmp_path / 'rm'}", "train.steps=2",
                         f"train.output_dir={tmp_path / 'ppo'}"))
    steps = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert summary["policy_version"] == 2
    evals = [s for s in steps if "eval/gold_reward_mean" in s]
    assert [s["step"] for s in evals] == [0, 2]
    for s in evals:
        assert math.isfinite(s["eval/proxy_reward_mean"]) and s["eval/proxy_reward_mean"] != s["eval/gold_reward_mean"]

    (result,) = west_of_n(cfg)
    synthetic = load_preferences(str(tmp_path / "won" / "round-1" / "pairs.jsonl")).pairs
    # 6 prompts, at most one pair each, the less confident half dropped
    assert len(synthetic) == result["west_of_n/pairs"] and 1 <= len(synthetic) <= 3
    assert (tmp_path / "won" / "round-1" / "model" / "config.json").exists()


def test_best_of_n_picks_what_the_reward_server_scores_highest(ray_session, tmp_path):
    result = best_of_n(tiny(tmp_path, "reward.scorer=vader", "best_of_n.n=4", "best_of_n.keep_rollouts=true",
                            f"best_of_n.output_dir={tmp_path}"), texts=[])
    # the reward server is the gold scorer here, so its best of 4 can only beat one sample
    assert result["best_of_n/gold_reward"] >= result["one_sample/gold_reward"]
    assert math.isfinite(result["best_of_n/gold_reward"])
    # every sample kept with its score: 4 for each of the 8 held-out prompts, the best ones' mean the result's
    replies, _ = load_scored(str(tmp_path / "rollouts"), ("prompt", "response", "reward"), None, "error", "x")
    groups = {}
    for r in replies:
        groups.setdefault(r.prompt, []).append(r.reward)
    assert len(replies) == 32 and sorted(map(len, groups.values())) == [4] * 8
    assert sum(map(max, groups.values())) / 8 == pytest.approx(result["best_of_n/gold_reward"])


def test_rm_report_trains_the_four_reward_models_and_prints_the_table(ray_session, tmp_path, capsys):
    from cluster.commands.rm_report import BEST_OF, report

    cfg = tiny(tmp_path, "west_of_n.num_prompts=12", "west_of_n.n=4", "west_of_n.quantile=0.5",
               "west_of_n.min_logprob=-.inf", "rm_report.pairs=6", "rm_report.eval_pairs=6",
               f"rm_report.output_dir={tmp_path / 'report'}")
    results = report(cfg)
    sizes = results["train_pairs"]
    # (b) and (d) add at most D West-of-N pairs, (c) exactly D more gold ones
    assert sizes["a"] == 6 and sizes["c"] == 12 and 6 < sizes["b"] <= 12 and 6 < sizes["d"] <= 12
    assert all(0.0 <= results["accuracy"][k] <= 1.0 for k in "abcd")
    for picker in ("a", "b", "gold"):
        assert sorted(results["best_of_n_gold_reward"][picker]) == list(BEST_OF)
    gold = results["best_of_n_gold_reward"]["gold"]
    # picking by the gold scorer itself can only get better with more samples
    assert gold[1] <= gold[4] <= gold[16]
    for k in "abcd":
        assert (tmp_path / "report" / f"rm_{k}" / "config.json").exists()
    out = capsys.readouterr().out
    assert "held-out pair accuracy" in out and "base + D West-of-N pairs, no filters" in out
