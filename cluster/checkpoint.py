"""Resumable checkpoints: `output_dir/checkpoints/step-NNNNNN/`.

    policy/          the policy as an HF model directory (transformers and vLLM load it) + value_head.pt
    learner/         weights and optimizer moments, sharded (torch.distributed.checkpoint): any number of
                     learner ranks can load them, whatever number wrote them
    learner.pt       KL controller, running score moments, policy version, random state of the minibatch order
    stream.json      data position (actors/prompt_ledger.py): the shuffle's state, every prompt drawn but not trained on
    meta.json        step, policy version, W&B run id, the reward trained on; written last, so a directory without it is incomplete

`output_dir` is a local path, a path every node mounts, or a storage URI (core/storage.py): on a
multi-node cluster the learner's node writes there and a learner on any node resumes from there. Locally a
checkpoint is written into `step-NNNNNN.partial` and renamed when complete; on a URI each part is staged
locally and uploaded whole, and meta.json goes last. Either way a job killed while writing never leaves a
checkpoint that looks whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from core import storage
from core.config import ConfigError

log = logging.getLogger(__name__)

PREFIX = "step-"


def checkpoints_dir(output_dir: str) -> str:
    return storage.join(output_dir, "checkpoints")


def _step(name: str) -> int | None:
    return int(name[len(PREFIX):]) if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() else None


def complete_checkpoints(output_dir: str) -> list[str]:
    """Whole checkpoints in `output_dir` (paths or URIs like it), oldest first."""
    root = storage.Location(checkpoints_dir(output_dir))
    steps = sorted(step for name in root.subdirs() if (step := _step(name)) is not None
                   and root.is_file(f"{name}/meta.json"))
    return [storage.join(root.location, f"{PREFIX}{step:06d}") for step in steps]


def resume_from(resume: str, output_dir: str) -> str | None:
    """The checkpoint `train.resume` names: None to start afresh."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        if not found:
            log.info("train.resume=auto: no checkpoint in %s yet, starting afresh", checkpoints_dir(output_dir))
            return None
        return found[-1]
    if not storage.Location(resume).is_file("meta.json"):
        raise ConfigError(f"train.resume = {resume!r} is not a complete checkpoint (no meta.json in it); give a "
                          f"directory like {checkpoints_dir(output_dir)}/{PREFIX}000010, or `auto`")
    return resume


def read_meta(path: str) -> dict:
    return json.loads(storage.Location(path).read_text("meta.json"))


def save(learner, ledger, step: int, output_dir: str, keep: int, watchdog, extra: dict | None = None) -> str:
    """Write a checkpoint of the learner and the data position (`ledger`) after `step`; keep the newest
    `keep`. `watchdog` bounds the wait for the learner."""
    start = time.perf_counter()
    final = storage.join(checkpoints_dir(output_dir), f"{PREFIX}{step:06d}")
    local = not storage.is_uri(output_dir)
    target = final + ".partial" if local else final
    place = storage.Location(target)
    place.delete("")  # a part written by an attempt that died
    version = watchdog.get(learner.save_checkpoint(target), "learner", "save_checkpoint")
    place.write_text("stream.json", json.dumps(ledger.state_dict()))
    meta = {"step": step, "policy_version": version, "saved_at": time.time(), **(extra or {})}
    place.write_text("meta.json", json.dumps(meta, indent=1))
    if local:
        shutil.rmtree(final, ignore_errors=True)
        Path(target).rename(final)
    root = storage.Location(checkpoints_dir(output_dir))
    for old in complete_checkpoints(output_dir)[:-keep]:
        root.delete(old.rsplit("/", 1)[-1])
    log.info("checkpoint of step %d written to %s in %.1f s", step, final, time.perf_counter() - start)
    return final


def restore(path: str, learner, stream, reward: str) -> dict:
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
    stream.resume(json.loads(storage.Location(path).read_text("stream.json")), version)
    log.info("resumed from %s: step %d, policy version %d", path, meta["step"], version)
    return meta
