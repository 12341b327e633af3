"""One fine-tuning loop for every model a command trains in its own process: the policy by SFT and by DPO,
and the Bradley-Terry reward model. Each says what a batch's loss is and what its held-out figures are; the
loop (shuffled batches for `epochs` epochs, AdamW, gradient-norm clipping, a progress line, the held-out
figures after each epoch, an HF directory at the end) is this one."""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist

from core.errors import InputError
from core.forward import response_forward
from core.progress import Progress
from learner.distributed import full_state_dict, is_distributed, load_full_state_dict, shard_layers, shard_whole
from learner.metrics import RunLogger

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"  # in the stage's output_dir


def seed_and_threads(cfg) -> None:
    """Seed torch and set its CPU threads before a trainer builds its model, so that a fresh head starts the same."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)


class ResponseForward(torch.nn.Module):
    """An HF causal LM's `response_forward` (core/forward.py) as a module's forward, which the trainers call
    through `padded_logprobs(trainer.lm, ..., forward=through)`: under a process group it is FSDP2's root unit,
    whose forward gathers what lies outside the decoder layers (embeddings, final norm, LM head)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = response_forward(self.model, input_ids, attention_mask, response_len, temperature)
        return logits, hidden.clone()  # a new tensor, not a view: FSDP2 hooks the backward of the outputs


def through(module: torch.nn.Module, input_ids, attention_mask, response_len: int, temperature: float):
    """The `forward` argument of core/forward.py's functions that runs a ResponseForward module."""
    return module(input_ids, attention_mask, response_len, temperature)


class Trainer:
    """`cfg` has the trainer fields (core/pipeline_config.py: lr, epochs, batch_size, max_grad_norm, device,
    seed...). A subclass builds its model and tokenizer (after `seed_and_threads`) and passes them here, and
    defines `loss` and `evaluate` (and `param_groups` and `extra_modules` where it has more than the model).

    In a process group of N ranks (learner/trainer_group.py) the model and the extra modules are sharded with
    FSDP2 and every rank takes its share of each batch, its loss weighted so that the ranks' mean gradient
    (FSDP2 averages them) is the whole batch's; held-out figures are computed alike on every rank."""

    name = "trainer"
    # The held-out figures before training too (epoch 0): where a fine-tuned policy started is worth knowing;
    # a reward model's freshly initialised head scores at chance.
    evaluate_first = True
    # A linear warm-up over the first 5% of the steps, then linear decay to zero: the usual schedule for
    # fitting a fresh head (reward models); otherwise the learning rate is constant.
    warmup_decay = False

    def __init__(self, cfg, model, tokenizer):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.device = torch.device(cfg.device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        self._lm = ResponseForward(model)
        if self.world > 1:
            shard_layers(self._lm, self.model, self.device, f"{self.name}.num_learners")
            for module in self.extra_modules().values():
                shard_whole(module, self.device)
        # fused: one kernel over all parameters, several times faster a step than the default on CPU
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, weight_decay=0.0, fused=True)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]  # clipped together
        self.steps = 0  # optimiser steps taken
        self.schedule = None

    @property
    def lm(self) -> ResponseForward:
        """The policy's forward (the reward model's trainer has its own), of whatever `self.model` now is (LoRA
        merged, say)."""
        if self._lm.model is not self.model:
            self._lm = ResponseForward(self.model)
        return self._lm

    def param_groups(self) -> list[dict]:
        """What the optimiser trains, in groups (each may set its own `lr`): the model's trainable parameters
        (with LoRA, the adapters only)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the model (ILQL's heads): sharded with it, in its checkpoints."""
        return {}

    def size(self, example) -> int:
        """What `loss` averages over in an example: 1 (a mean over examples); a mean over reply tokens counts
        the example's reply tokens."""
        return 1

    def share(self, batch: list) -> tuple[list, float]:
        """This rank's share of `batch` and the weight of its mean loss (its share of the batch's `size`, times
        N: FSDP2 averages the ranks' gradients, so their mean is the whole batch's). The shares are every N-th
        example; a rank left without one computes on the first example with weight 0, so that every rank runs
        the same forwards (FSDP2 gathers the weights in them)."""
        if self.world == 1:
            return batch, 1.0
        part = batch[self.rank::self.world]
        if not part:
            return batch[:1], 0.0
        return part, sum(map(self.size, part)) * self.world / sum(map(self.size, batch))

    def backward(self, batch: list) -> tuple[torch.Tensor, dict[str, float]]:
        """The gradient of the batch's loss (this rank's share of it), accumulated into the parameters; returns
        the share's loss and training figures."""
        part, weight = self.share(batch)
        loss, stats = self.loss(part)
        (loss * weight).backward()
        return loss, stats

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

    def full_state(self) -> dict[str, dict]:
        """The model's and the extra modules' whole state dicts (gathered onto rank 0 under a process group,
        empty on the others; every rank must call it)."""
        return {name: full_state_dict(module) for name, module in {"model": self.model,
                                                                   **self.extra_modules()}.items()}

    def load_full_state(self, state: dict[str, dict]) -> None:
        """Load `full_state`'s dicts (under a process group: every rank, each taking its shards)."""
        for name, module in {"model": self.model, **self.extra_modules()}.items():
            load_full_state_dict(module, state[name])

    def checkpoint_path(self) -> Path:
        return Path(self.cfg.output_dir) / CHECKPOINT

    def save_checkpoint(self, shape: dict) -> None:
        """The training state after `self.steps` steps, whole or not at all (written aside, then renamed);
        `shape` is what a resume must match (the examples and the batch size)."""
        path = self.checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"steps": self.steps, "shape": shape, "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "extra": {name: module.state_dict() for name, module in self.extra_modules().items()},
                    "schedule": self.schedule.state_dict() if self.schedule else None}, tmp)
        os.replace(tmp, path)
        log.info("%s: checkpoint after step %d in %s", self.name, self.steps, path)

    def load_checkpoint(self, shape: dict) -> int:
        """Restore the state `save_checkpoint` wrote; returns the steps it had taken. A checkpoint of other data
        or another batch size is refused: its step count would point elsewhere in the batches."""
        path = self.checkpoint_path()
        if not path.is_file():
            raise InputError(f"{self.name}.resume = true but there is no checkpoint at {path}: run without resume, or "
                             f"point {self.name}.output_dir at the run to continue")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["shape"] != shape:
            raise InputError(f"{path} was made on {state['shape']}, this run has {shape}: resume with the same data, "
                             f"epochs and {self.name}.batch_size, or start anew without {self.name}.resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, module in self.extra_modules().items():
            module.load_state_dict(state["extra"][name])
        if self.schedule and state["schedule"]:
            self.schedule.load_state_dict(state["schedule"])
        self.steps = state["steps"]
        print(f"{self.name}: resumed from {path} after step {self.steps}", flush=True)
        return self.steps

    def _schedule(self, total: int):
        if not self.warmup_decay:
            return None
        warmup = max(1, total // 20)
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    def train(self, train: list, held_out: list, logger: RunLogger | None = None) -> list[dict]:
        """`cfg.epochs` passes in shuffled batches; one entry per epoch with the mean of each training figure and
        the held-out figures (when there are held-out examples), after an epoch-0 entry if `evaluate_first`.
        `logger` gets each step's training figures and each epoch's held-out ones (metrics.jsonl and W&B), by
        optimiser step."""
        if not train:
            raise ValueError(f"{self.name}: nothing to train on; the training set is empty")
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = per_epoch * cfg.epochs
        self.schedule = self._schedule(total)
        shape = {"examples": len(train), "batch_size": cfg.batch_size, "epochs": cfg.epochs}
        done = self.load_checkpoint(shape) if cfg.resume else 0
        history = [{"epoch": 0, **self.evaluate(held_out)}] if self.evaluate_first and held_out and not done else []
        if logger and history:
            logger.log(0, history[0])
        progress = Progress(self.name, total - done, "steps", every_s=30.0)
        for epoch in range(1, cfg.epochs + 1):
            order = list(train)
            rng.shuffle(order)  # every epoch's, so that a resumed run's batches are the first run's
            if epoch * per_epoch <= done:
                continue
            self.model.train()
            figures: dict[str, list[float]] = {}
            for index, start in enumerate(range(0, len(order), cfg.batch_size)):
                if (epoch - 1) * per_epoch + index < done:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss, stats = self.backward(order[start:start + cfg.batch_size])
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.steps += 1
                self.after_step()
                if self.schedule:
                    self.schedule.step()
                if cfg.checkpoint_every and (self.steps % cfg.checkpoint_every == 0 or self.steps == total):
                    self.save_checkpoint(shape)
                step_figures = {"train/loss": loss.item(), **stats}
                for k, v in step_figures.items():
                    figures.setdefault(k, []).append(v)
                if logger:
                    logger.log(self.steps, {**step_figures, "epoch": epoch})
                recent = ", ".join(f"{k.removeprefix('train/')} {sum(v[-10:]) / len(v[-10:]):.3f}"
                                   for k, v in figures.items())
                progress.advance(1, f"epoch {epoch}/{cfg.epochs}, {recent} (last 10 steps)")
            history.append({"epoch": epoch, **{k: sum(v) / len(v) for k, v in figures.items()},
                            **(self.evaluate(held_out) if held_out else {})})
            if logger:
                logger.log(self.steps, {k: v for k, v in history[-1].items() if k.startswith("eval/")})
            log.info("%s epoch %d/%d: %s", self.name, epoch, cfg.epochs,
                     ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items() if k != "epoch"))
        return history

    def merge_adapters(self) -> None:
        """With LoRA adapters, fold them into the base weights (peft's merge) for good: the model is then an
        ordinary one, to save and to use; training ends here."""
        if hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()

    def save(self, path: str) -> str:
        """An HF directory (model + tokenizer, LoRA adapters merged) at `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.merge_adapters()
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return str(out)
