"""Resumable checkpoints: `output_dir/checkpoints/step-NNNNNN/`.

    policy/          the policy as an HF model directory (transformers and vLLM load it) + value_head.pt
    learner/         weights and optimizer moments, sharded (torch.distributed.checkpoint): any number of
                     learner ranks can load them, whatever number wrote them
    learner.pt       KL controller, running score moments, policy version, random state of the minibatch order
    stream.json      data position (actors/prompt_ledger.py): the shuffle's state, every prompt drawn but not trained on
    meta.json        step, policy version, W&B run id, the reward trained on; written last, so a directory without it is incomplete

A checkpoint is written into `step-NNNNNN.partial` and renamed when complete, so a job killed while
writing never leaves a checkpoint that looks whole. On a multi-node cluster `train.output_dir` must
be a path that the learner's node and the driver's node both see (a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from cluster.config import ConfigError

log = logging.getLogger(__name__)

PREFIX = "step-"


def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Whole checkpoints in `output_dir`, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resume_from(resume: str, output_dir: str) -> Path | None:
    """The checkpoint `train.resume` names: None to start afresh."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        if not found:
            log.info("train.resume=auto: no checkpoint in %s yet, starting afresh", checkpoints_dir(output_dir))
            return None
        return found[-1]
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"train.resume = {resume!r} is not a complete checkpoint (no meta.json in it); give a "
                          f"directory like {checkpoints_dir(output_dir)}/{PREFIX}000010, or `auto`")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def save(learner, ledger, step: int, output_dir: str, keep: int, watchdog, extra: dict | None = None) -> Path:
    """Write a checkpoint of the learner and the data position (`ledger`) after `step`; keep the newest
    `keep`. `watchdog` bounds the wait for the learner."""
    start = time.perf_counter()
    final = checkpoints_dir(output_dir) / f"{PREFIX}{step:06d}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    version = watchdog.get(learner.save_checkpoint(str(partial)), "learner", "save_checkpoint")
    (partial / "stream.json").write_text(json.dumps(ledger.state_dict()))
    meta = {"step": step, "policy_version": version, "saved_at": time.time(), **(extra or {})}
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint of step %d written to %s in %.1f s", step, final, time.perf_counter() - start)
    return final


def restore(path: Path, learner, stream, reward: str) -> dict:
    """Load a checkpoint into the learner and the stream; returns its meta (the step to continue after).

    Where the checkpoint was trained on another reward than `reward` (this run's `reward.scorer`: online RLHF's
    next round, on a retrained reward model), the learner's reward statistics start afresh: the running score
    moments measured the old model's scale, and an adaptive KL coefficient was balanced against its rewards."""
    meta = read_meta(path)
    same_reward = meta.get("reward", reward) == reward
    if not same_reward:
        log.info("%s was trained on the reward %s, this run on %s: the running score moments and the KL "
                 "coefficient start afresh", path, meta["reward"], reward)
    version = stream.watchdog.get(learner.load_checkpoint(str(path), same_reward), "learner", "load_checkpoint")
    stream.resume(json.loads((path / "stream.json").read_text()), version)
    log.info("resumed from %s: step %d, policy version %d", path, meta["step"], version)
    return meta
