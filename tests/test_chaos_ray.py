"""`rlhf chaos` on a simulated cluster with the tiny model: every kind of fault fires against the live job,
which is whole again after each with every prompt counted once, and the report says so."""

import json

import pytest
import ray

from cluster.chaos import KINDS, chaos
from cluster.commands import DEFAULT_CONFIG
from core.config import ConfigError, load_config
from learner.distributed import free_port

pytestmark = [pytest.mark.ray, pytest.mark.multinode]

TINY = DEFAULT_CONFIG.parent / "tiny.yaml"


def config(out, *overrides):
    return load_config(TINY, [f"train.output_dir={out}", f"reward.port={free_port()}", "train.eval_every=100",
                              "generation.num_cpus=1", "train.checkpoint_every=2", *overrides])


@pytest.mark.slow  # 5 minutes; each fault kind is also in test_faults_ray.py and test_multinode_ray.py
def test_a_schedule_of_every_fault_leaves_the_job_whole_each_time(tmp_path, capsys):
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    schedule = ["1:kill-worker", "2:hang-worker:6", "3:stop-reward:6", "4:kill-learner", "6:kill-node"]
    faults = chaos(config(tmp_path, "train.steps=500", "reward.timeout_s=5", "reward.retry_interval_s=0.5"),
                   schedule, simulate=True)
    assert [f.kind for f in faults] == list(KINDS)
    for fault in faults:
        assert fault.whole_s is not None and fault.whole_s > 0, fault
        counts = fault.counts
        assert counts["prompts_trained_twice"] == 0, fault
        assert counts["prompts_drawn"] == counts["prompts_trained"] + counts["prompts_pending"], fault
    assert faults[-1].victim.startswith("node generation-")
    printed = capsys.readouterr().out
    table = printed[printed.index("=== rlhf chaos: 5 faults, "):].splitlines()[1:]
    assert [row.split(" | ")[0] for row in table[2:7]] == [
        "| kill-worker", "| hang-worker:6 s", "| stop-reward:6 s", "| kill-learner", "| kill-node"]
    report = json.loads((tmp_path / "chaos.json").read_text())
    assert report["summary"]["learner_restarts"] == 1 and report["summary"]["stopped_by"] == "SIGTERM"


def test_a_schedule_is_checked_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="unknown fault 'kill-everything'"):
        chaos(config(tmp_path), ["2:kill-everything"], simulate=True)
    with pytest.raises(ConfigError, match="hang-worker takes a duration"):
        chaos(config(tmp_path), ["2:hang-worker"], simulate=True)
    with pytest.raises(ConfigError, match="train.steps = 3, but the last fault fires after step 4"):
        chaos(config(tmp_path), ["4:kill-worker"], simulate=True)
