"""Iterated online RLHF end to end with the tiny model and real vLLM: two rounds of PPO against a reward
model that is retrained each round on pairs of the current policy's samples."""

import json

import pytest

from cluster.cli import main
from learner.distributed import free_port
from tests.helpers import TINY

pytestmark = pytest.mark.ray


def test_two_rounds_continue_one_ppo_run_against_fresh_reward_models(ray_session, tmp_path, capsys):
    out = tmp_path / "online"
    assert main(["online-rlhf", "--config", str(TINY), f"online.output_dir={out}", "online.rounds=2",
                 "online.ppo_steps=1", "online.initial_pairs=8", "online.pairs_per_round=8", "rm.epochs=1",
                 f"reward.port={free_port()}", "preferences.min_margin=0.0"]) == 0
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and [r["ppo_steps"] for r in rounds] == [1, 2]
    assert rounds[1]["pairs"] > rounds[0]["pairs"] > 6  # old plus new pairs
    assert all(0.0 <= r["rm_accuracy_on_policy_pairs_before"] <= 1.0 for r in rounds)
    assert (out / "rm-2" / "config.json").is_file() and (out / "ppo" / "checkpoint" / "config.json").is_file()
    steps = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps) == 2  # one run, continued
    assert "round 2: after 2 PPO steps held-out gold" in capsys.readouterr().out
