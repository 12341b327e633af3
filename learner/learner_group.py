"""The learner group: `ppo.num_learners` learner ranks (Ray actors of learner/learner.py's PPOLearner, one per
device) that act as one learner.

Every call goes to every rank (the ranks meet in the same collectives) and one answer comes back: rank 0's,
once all ranks have answered, or the first rank's error as soon as there is one. Each method returns an
ObjectRef, as an actor call does, so the training loop waits on the group as it would on one learner.
cluster/launch.py places the ranks (`launch_learners`).
"""

from __future__ import annotations

import ray

from actors.nodes import on_this_node


@ray.remote(num_cpus=0, max_retries=0)
def _first_of_all(refs: list[ray.ObjectRef]):
    """Rank 0's answer once every rank has answered; the first error as soon as one rank fails (the others
    may be stuck in a collective waiting for it)."""
    return all_answers(refs)[0]


def all_answers(refs: list[ray.ObjectRef]) -> list:
    """Every rank's answer once all have answered; the first error as soon as one rank fails (the others may be
    stuck in a collective waiting for it)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


class _RefLogprobs:
    """The group's `ref_logprobs`, called as an actor's method is (`.remote(prompt_ids, response_ids,
    temperature)`), so that the group stands where the reference actor would."""

    def __init__(self, group: LearnerGroup):
        self.group = group

    def remote(self, prompt_ids, response_ids, temperature=None) -> ray.ObjectRef:
        return self.group._one([rank.ref_logprobs.remote(prompt_ids, response_ids, temperature)
                                for rank in self.group.ranks])


class LearnerGroup:
    def __init__(self, ranks: list, placement_group=None):
        """`ranks`: the learner ranks' actor handles, rank 0 first; `placement_group`: theirs, removed with them."""
        self.ranks = ranks
        self.placement_group = placement_group

    @staticmethod
    def _one(refs: list[ray.ObjectRef]) -> ray.ObjectRef:
        """One answer for the calls made on every rank: rank 0's (module docstring)."""
        if len(refs) == 1:
            return refs[0]
        # On the driver's node: a task on a lost node would fail with the node, not with the rank's error.
        return _first_of_all.options(scheduling_strategy=on_this_node()).remote(refs)

    def update(self, rollouts: list) -> ray.ObjectRef:
        """One PPO update on the batch (each rank trains on its share of every minibatch) -> metrics."""
        rollouts = ray.put(rollouts) if len(self.ranks) > 1 else rollouts
        return self._one([rank.update.remote(rollouts) for rank in self.ranks])

    def publish(self) -> ray.ObjectRef:
        """The current policy version for the workers (learner/publication.py)."""
        return self._one([rank.publish.remote() for rank in self.ranks])

    @property
    def ref_logprobs(self) -> _RefLogprobs:
        """A group that holds the reference (a frozen copy, or LoRA's base with adapters off) answers the
        reference actor's call, every rank computing, as a sharded forward needs them all."""
        return _RefLogprobs(self)

    def open_weight_transfer(self, workers: list) -> ray.ObjectRef:
        """`ppo.weight_transfer=nccl`: the NCCL group between rank 0 and the generation workers."""
        return self._one([rank.open_weight_transfer.remote(workers) for rank in self.ranks])

    def perplexity(self, examples: list) -> ray.ObjectRef:
        """The policy's perplexity on the replies of encoded held-out demonstrations -> {eval/loss, eval/perplexity}."""
        return self._one([rank.perplexity.remote(examples) for rank in self.ranks])

    def weights(self) -> ray.ObjectRef:
        """The whole policy in the workers' dtype as one state dict, gathered on rank 0 (for tests)."""
        return self._one([rank.weights.remote() for rank in self.ranks])

    def get_version(self) -> ray.ObjectRef:
        return self._one([rank.get_version.remote() for rank in self.ranks])

    def save(self, path: str) -> ray.ObjectRef:
        """The HF model directory of the policy, written by rank 0 -> its path."""
        return self._one([rank.save.remote(path) for rank in self.ranks])

    def save_checkpoint(self, path: str) -> ray.ObjectRef:
        """A resumable checkpoint, each rank writing its shards -> the policy version."""
        return self._one([rank.save_checkpoint.remote(path) for rank in self.ranks])

    def load_checkpoint(self, path: str, reward_state: bool = True) -> ray.ObjectRef:
        """Continue from a checkpoint written by any number of ranks (its reward statistics too, unless not
        `reward_state`) -> the policy version."""
        return self._one([rank.load_checkpoint.remote(path, reward_state) for rank in self.ranks])

    def pids(self) -> list[int]:
        return ray.get([rank.pid.remote() for rank in self.ranks])

    def kill(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
