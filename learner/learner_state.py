"""A learner's state outside its update: the metrics of an update gathered over minibatches and ranks, and
what a learner writes to disk (the HF export, resumable checkpoints) and holds in memory.

A checkpoint directory (cluster/checkpoint.py lays them out per step):
    policy/      the HF export (`save_policy`): transformers and vLLM load it, plus value_head.pt
    learner/     the weights and the optimizer's moments, sharded (torch.distributed.checkpoint): any number
                 of ranks can load them, whatever number wrote them
    learner.pt   the KL controller, the running score moments, the policy version, the random state of the
                 minibatch order and PPO-ptx's place in its demonstrations
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from core import storage
from core.rollout import RolloutBatch
from learner import distributed, ppo_math

if TYPE_CHECKING:
    from learner.learner import PPOLearner


def summed_over_ranks(stats: dict[str, torch.Tensor], share: torch.Tensor, terms: dict, world: int
                      ) -> dict[str, float]:
    """A minibatch step's figures as one learner would report them: each rank's statistic weighted by its
    share of the rows (`share`, the loss terms by their own weight), summed over the ranks; `loss/total` from
    the terms and their coefficients. `terms`: name -> (loss, its rank's weight, coefficient)."""
    weights = [share] * len(stats) + [weight for _, weight, _ in terms.values()]
    named = {**stats, **{name: term for name, (term, _, _) in terms.items()}}
    values = torch.stack([v.detach().float() * w for v, w in zip(named.values(), weights)]) / world
    values = dict(zip(named, distributed.sum_across_ranks(values).tolist()))
    values["loss/total"] = sum(coef * values[name] for name, (_, _, coef) in terms.items())
    return values


def update_metrics(steps: list[dict[str, float]], batch: RolloutBatch, offpolicy: dict, score_metrics: dict,
                   advantages: torch.Tensor, kl_per_seq: torch.Tensor | None, kl_coef: float,
                   old_values: torch.Tensor | None, version: int) -> dict[str, float]:
    """An update's metrics: the minibatch steps' means, the off-policy weights, the scores, the advantages, the
    KL to the reference (None: not measured) and the batch."""
    mask = batch.response_mask
    metrics = {k: sum(step[k] for step in steps) / len(steps) for k in steps[0]}
    metrics.update({f"offpolicy/{k}": v.item() for k, v in offpolicy.items()})
    metrics.update(score_metrics)
    if old_values is not None:
        metrics["value/mean"] = ppo_math.masked_mean(old_values, mask).item()
    if kl_per_seq is not None:
        metrics["kl/mean"] = kl_per_seq.mean().item()
    B = len(batch.scores)
    metrics.update({
        "kl/coef": kl_coef,
        "advantage/abs_mean": ppo_math.masked_mean(advantages.abs(), mask).item(),
        "rollout/score_mean": batch.scores.mean().item(),
        "rollout/score_std": batch.scores.std().item() if B > 1 else 0.0,
        "rollout/response_len": mask.sum(-1).mean().item(),
        "rollout/finished_frac": batch.finished.float().mean().item(),
        "version/learner": version,
        "learner/tokens": mask.sum().item(),
    })
    return metrics


def save_policy(learner: PPOLearner, path: str) -> str:
    """The learner's policy as an HF model directory plus value_head.pt (with the version and the KL
    controller), written by rank 0; every rank of a group must call it. `path` may be a storage URI."""
    with storage.staged(path) as out:
        learner.trained.save(out, learner.rank == 0, {"version": learner.version, "kl_ctl": learner.kl_ctl.state_dict()})
    return str(path)


def save_checkpoint(learner: PPOLearner, path: str) -> int:
    """Everything `load_checkpoint` needs to continue exactly (the module docstring's layout), as any number of
    ranks can load it. `path` may be a storage URI: each rank writes its part locally, then uploads it.
    Returns the policy version."""
    with storage.staged(path) as out:
        save_policy(learner, str(out / "policy"))
        distributed.save_sharded(out / "learner", learner.model, learner.optimizer)
        if learner.rank == 0:
            torch.save({"kl_ctl": learner.kl_ctl.state_dict(), "score_moments": learner.score_moments.state_dict(),
                        "version": learner.version, "generator": learner.generator.get_state(),
                        "ptx_next": learner.ptx_next, "torch_rng": torch.get_rng_state()}, out / "learner.pt")
    return learner.version


def load_checkpoint(learner: PPOLearner, path: str, reward_state: bool = True) -> int:
    """Continue from `save_checkpoint(path)`, written by this or another number of ranks: its weights replace
    the ones the learner started from. Without `reward_state` the KL controller and the running score moments
    are not loaded (the checkpoint was trained on another reward). `path` may be a storage URI. Returns the
    policy version."""
    if not storage.Location(path).is_dir("learner"):
        raise ValueError(f"{path} has no sharded learner state (learner/): it was written by an older version "
                         f"of this project; start afresh or resume from a newer checkpoint")
    with storage.fetched(path, ("learner", "learner.pt")) as out:
        distributed.load_sharded(out / "learner", learner.model, learner.optimizer)
        # On the CPU: the random states must stay CPU byte tensors.
        state = torch.load(out / "learner.pt", map_location="cpu", weights_only=False)
    if reward_state:
        learner.kl_ctl.load_state_dict(state["kl_ctl"])
        learner.score_moments.load_state_dict(state["score_moments"])
    learner.version = state["version"]
    learner.ptx_next = state.get("ptx_next", 0)  # where the demonstrations' cycle goes on
    learner.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return learner.version


def memory(learner: PPOLearner) -> dict[str, int]:
    """Bytes this rank holds of the weights, the gradients and the optimizer state (its shards)."""
    def nbytes(tensors) -> int:
        return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)

    params = list(learner.model.parameters())
    return {"weights": nbytes(params), "gradients": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for state in learner.optimizer.state.values() for v in state.values()
                                if torch.is_tensor(v) and v.dim() > 0)}
