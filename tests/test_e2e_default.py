"""The default job on the real SmolLM2-135M-Instruct, cut to two steps: the `rlhf train` command runs
end to end as a user runs it and writes its summary, metrics and checkpoint, with one learner and with a
group of two. Several minutes each on CPU."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_default_job_runs_two_steps(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "train.steps=2", "train.eval_every=2",
                           f"train.output_dir={out}", "train.wandb_mode=offline", "reward.port=8311"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout and "=== summary ===" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy_version"] == 2 and summary["eval/kl_after"] < 10
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert list((out / "wandb").glob("offline-run-*"))


def test_the_default_job_trains_on_a_learner_group_of_two_ranks(tmp_path):
    """The default job's rows share prompts (4 samples each), the case that once crashed FSDP2's backward:
    two learner ranks of SmolLM2 train its steps and leave a checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "train.steps=2", "train.eval_every=100",
                           "ppo.num_learners=2", "ppo.num_cpus=1", "ppo.threads=1", f"train.output_dir={out}",
                           "train.wandb_mode=disabled", "reward.port=8312"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout and "the learner died" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy_version"] == 2
    assert (out / "checkpoint" / "model.safetensors").is_file()
