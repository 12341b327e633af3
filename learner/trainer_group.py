"""A policy stage's trainer (`rlhf sft|dpo|ilql`) on `<stage>.num_learners` ranks: Ray actors, one per device,
joined in one process group, each holding 1/N of the model (and of a stage's heads) with FSDP2 and training on
its share of every batch (learner/trainer.py). When they are done, rank 0's gathered weights are loaded into a
trainer in the command's own process, which saves and evaluates the result as a one-rank run does.
"""

from __future__ import annotations

import math
from typing import Callable

import ray
import torch

from learner.distributed import free_port, init_group
from learner.learner_group import all_answers
from learner.trainer import Trainer

COLLECTIVE_TIMEOUT_S = 1800.0  # the longest a rank waits for the others in one collective


class TrainerRank:
    """One rank of a trainer group, a Ray actor."""

    def address(self) -> str:
        """tcp://<this node's IP>:<a free port>, where rank 0 meets the others."""
        return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"

    def start(self, rendezvous: str, rank: int, world: int, make: Callable[[], Trainer], device: str) -> None:
        init_group(rendezvous, rank, world, torch.device(device), COLLECTIVE_TIMEOUT_S)
        self.trainer = make()

    def train(self, train: list, held_out: list) -> list[dict]:
        return self.trainer.train(train, held_out)

    def full_state(self) -> dict:
        return self.trainer.full_state()

    def load_full_state(self, state: dict) -> None:
        self.trainer.load_full_state(state)

    def gradients(self, batch: list) -> dict[str, torch.Tensor]:
        """The whole gradient of `batch`'s loss, by parameter name, gathered (rank 0's answer counts)."""
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.trainer.backward(batch)
        return {name: p.grad.full_tensor() for name, p in _named_parameters(self.trainer) if p.grad is not None}


def _named_parameters(trainer: Trainer):
    for prefix, module in {"model": trainer.model, **trainer.extra_modules()}.items():
        for name, p in module.named_parameters():
            yield f"{prefix}.{name}", p


def start_ranks(make: Callable[[], Trainer], cfg) -> list:
    """`cfg.num_learners` ranks, each with its trainer built by `make` (a picklable callable) and sharded."""
    cuda = cfg.device == "cuda"
    ranks = [ray.remote(TrainerRank).options(num_cpus=0 if cuda else 1, num_gpus=1 if cuda else 0,
                                             max_restarts=0).remote() for _ in range(cfg.num_learners)]
    try:
        rendezvous = ray.get(ranks[0].address.remote())
        all_answers([rank.start.remote(rendezvous, i, len(ranks), make, cfg.device) for i, rank in enumerate(ranks)])
    except BaseException:
        stop_ranks(ranks)
        raise
    return ranks


def stop_ranks(ranks: list) -> None:
    for rank in ranks:
        ray.kill(rank)


def train_stage(make: Callable[[], Trainer], cfg, train: list, held_out: list, logger=None
                ) -> tuple[Trainer, list[dict]]:
    """(a trainer in this process holding the trained weights, the history of `Trainer.train`): trained here
    when `cfg.num_learners` is 1, else on that many ranks (Ray must be up), their result loaded into a trainer
    built here by `make`. `logger` gets every step's figures from a one-rank run, each epoch's from a group."""
    if cfg.num_learners == 1:
        trainer = make()
        return trainer, trainer.train(train, held_out, logger)
    ranks = start_ranks(make, cfg)
    try:
        history = all_answers([rank.train.remote(train, held_out) for rank in ranks])[0]
        state = all_answers([rank.full_state.remote() for rank in ranks])[0]
    finally:
        stop_ranks(ranks)
    trainer = make()
    trainer.load_full_state(state)
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    trainer.steps = per_epoch * cfg.epochs  # the steps the ranks took
    if logger:
        for entry in history:
            logger.log(entry["epoch"] * per_epoch, entry)
    return trainer, history
