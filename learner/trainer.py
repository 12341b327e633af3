"""One fine-tuning loop for every model a command trains in its own process: the policy by SFT and by DPO,
and the Bradley-Terry reward model. Each says what a batch's loss is and what its held-out figures are; the
loop (shuffled batches for `epochs` epochs, AdamW, gradient-norm clipping, a progress line, the held-out
figures after each epoch, an HF directory at the end) is this one."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch

from core.progress import Progress

log = logging.getLogger(__name__)


def seed_and_threads(cfg) -> None:
    """Seed torch and set its CPU threads before a trainer builds its model, so that a fresh head starts the same."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)


class Trainer:
    """`cfg` has the trainer fields (core/pipeline_config.py: lr, epochs, batch_size, max_grad_norm, device,
    seed...). A subclass builds its model and tokenizer (after `seed_and_threads`), passes them here with the
    parameter groups to optimise (default: all), and defines `loss` and `evaluate`."""

    name = "trainer"
    # The held-out figures before training too (epoch 0): where a fine-tuned policy started is worth knowing;
    # a reward model's freshly initialised head scores at chance.
    evaluate_first = True
    # A linear warm-up over the first 5% of the steps, then linear decay to zero: the usual schedule for
    # fitting a fresh head (reward models); otherwise the learning rate is constant.
    warmup_decay = False

    def __init__(self, cfg, model, tokenizer, param_groups: list[dict] | None = None):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.device = torch.device(cfg.device)
        # fused: one kernel over all parameters, several times faster a step than the default on CPU
        self.optimizer = torch.optim.AdamW(param_groups or model.parameters(), lr=cfg.lr, weight_decay=0.0,
                                           fused=True)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]  # clipped together
        self.steps = 0  # optimiser steps taken

    def loss(self, batch: list) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss to minimise and its other training figures (`train/...`)."""
        raise NotImplementedError

    def evaluate(self, examples: list) -> dict[str, float]:
        """The held-out figures (`eval/...`) of `examples`."""
        raise NotImplementedError

    @torch.no_grad()
    def held_out_means(self, examples: list, losses) -> dict[str, float]:
        """The held-out figures (`eval/loss` and `eval/<stat>`) of `losses(batch) -> (loss, stats)` over `examples`
        in batches, each weighted by its batch's size."""
        self.model.eval()
        totals: dict[str, float] = {}
        for start in range(0, len(examples), self.cfg.batch_size):
            batch = examples[start:start + self.cfg.batch_size]
            loss, stats = losses(batch)
            for k, v in {"loss": loss, **stats}.items():
                totals[k] = totals.get(k, 0.0) + v.item() * len(batch)
        return {f"eval/{k}": v / max(len(examples), 1) for k, v in totals.items()}

    def after_step(self) -> None:
        """Called after each optimiser step (`self.steps` counts them)."""

    def _schedule(self, total: int):
        if not self.warmup_decay:
            return None
        warmup = max(1, total // 20)
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    def train(self, train: list, held_out: list) -> list[dict]:
        """`cfg.epochs` passes in shuffled batches; one entry per epoch with the mean of each training figure and
        the held-out figures (when there are held-out examples), after an epoch-0 entry if `evaluate_first`."""
        if not train:
            raise ValueError(f"{self.name}: nothing to train on; the training set is empty")
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
        schedule = self._schedule(total)
        history = [{"epoch": 0, **self.evaluate(held_out)}] if self.evaluate_first and held_out else []
        progress = Progress(self.name, total, "steps", every_s=30.0)
        for epoch in range(1, cfg.epochs + 1):
            self.model.train()
            order = list(train)
            rng.shuffle(order)
            figures: dict[str, list[float]] = {}
            for start in range(0, len(order), cfg.batch_size):
                loss, stats = self.loss(order[start:start + cfg.batch_size])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.steps += 1
                self.after_step()
                if schedule:
                    schedule.step()
                for k, v in {"train/loss": loss.item(), **stats}.items():
                    figures.setdefault(k, []).append(v)
                recent = ", ".join(f"{k.removeprefix('train/')} {sum(v[-10:]) / len(v[-10:]):.3f}"
                                   for k, v in figures.items())
                progress.advance(1, f"epoch {epoch}/{cfg.epochs}, {recent} (last 10 steps)")
            history.append({"epoch": epoch, **{k: sum(v) / len(v) for k, v in figures.items()},
                            **(self.evaluate(held_out) if held_out else {})})
            log.info("%s epoch %d/%d: %s", self.name, epoch, cfg.epochs,
                     ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items() if k != "epoch"))
        return history

    def save(self, path: str) -> str:
        """An HF directory (model + tokenizer) at `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return str(out)
