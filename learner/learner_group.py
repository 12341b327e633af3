"""The learner group: `ppo.num_learners` learner ranks (Ray actors of learner/learner.py's PPOLearner, one per
device) that act as one learner.

Every call goes to every rank (the ranks meet in the same collectives) and one answer comes back: rank 0's,
once all ranks have answered, or the first rank's error as soon as there is one. Each method returns an
ObjectRef, as an actor call does, so the training loop waits on the group as it would on one learner.
cluster/launch.py places the ranks (`launch_learners`).
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0, max_retries=0)
def _first_of_all(refs: list[ray.ObjectRef]):
    """Rank 0's answer once every rank has answered; the first error as soon as one rank fails (the others
    may be stuck in a collective waiting for it)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs[0])


class _GroupMethod:
    """A learner method called as an actor's is (`.remote(*args)`), on every rank of the group."""

    def __init__(self, group: LearnerGroup, name: str):
        self.group, self.name = group, name

    def remote(self, *args) -> ray.ObjectRef:
        return self.group._all(self.name, *args)


class LearnerGroup:
    def __init__(self, ranks: list, placement_group=None):
        """`ranks`: the learner ranks' actor handles, rank 0 first; `placement_group`: theirs, removed with them."""
        self.ranks = ranks
        self.placement_group = placement_group

    def _all(self, method: str, *args) -> ray.ObjectRef:
        refs = [getattr(rank, method).remote(*args) for rank in self.ranks]
        return refs[0] if len(refs) == 1 else _first_of_all.remote(refs)

    def update(self, rollouts: list) -> ray.ObjectRef:
        """One PPO update on the batch (each rank trains on its share of every minibatch) -> metrics."""
        return self._all("update", ray.put(rollouts) if len(self.ranks) > 1 else rollouts)

    def publish(self) -> ray.ObjectRef:
        """The policy published in buckets for the workers (actors/weights.py PublishedWeights)."""
        return self._all("publish")

    @property
    def ref_logprobs(self) -> _GroupMethod:
        """With LoRA the group is the reference model too (the base with adapters off; every rank computes,
        as a sharded forward needs them all): `ref_logprobs.remote(prompt_ids, response_ids, temperature)`, as
        the reference actor answers it."""
        return _GroupMethod(self, "ref_logprobs")

    def open_weight_transfer(self, workers: list) -> ray.ObjectRef:
        """`ppo.weight_transfer=nccl`: the NCCL group between rank 0 and the generation workers."""
        return self._all("open_weight_transfer", workers)

    def perplexity(self, examples: list) -> ray.ObjectRef:
        """The policy's perplexity on the replies of encoded held-out demonstrations -> {eval/loss, eval/perplexity}."""
        return self._all("perplexity", examples)

    def weights(self) -> ray.ObjectRef:
        """The whole policy in the workers' dtype as one state dict, gathered on rank 0 (for tests)."""
        return self._all("weights")

    def get_version(self) -> ray.ObjectRef:
        return self._all("get_version")

    def save(self, path: str) -> ray.ObjectRef:
        """The HF model directory of the policy, written by rank 0 -> its path."""
        return self._all("save", path)

    def save_checkpoint(self, path: str) -> ray.ObjectRef:
        """A resumable checkpoint, each rank writing its shards -> the policy version."""
        return self._all("save_checkpoint", path)

    def load_checkpoint(self, path: str, reward_state: bool = True) -> ray.ObjectRef:
        """Continue from a checkpoint written by any number of ranks (its reward statistics too, unless not
        `reward_state`) -> the policy version."""
        return self._all("load_checkpoint", path, reward_state)

    def pids(self) -> list[int]:
        return ray.get([rank.pid.remote() for rank in self.ranks])

    def kill(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
