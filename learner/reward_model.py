"""Reward-model training: a scalar head on a base LM, fitted to preference pairs with the
Bradley-Terry loss, judged by held-out pair accuracy after every epoch.

The saved directory is an ordinary `AutoModelForSequenceClassification` (num_labels=1) plus its
tokenizer, which the reward server's `model:<dir>` scorer loads unchanged; both encode a pair with
`conversation_rewards`, so the model is scored on exactly the text and pooling it was trained with.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from core.forward import autocast, torch_dtype
from core.preferences import PreferencePair
from core.progress import Progress
from reward_server.scorers import configure_padding, conversation_rewards

if TYPE_CHECKING:
    from core.config import RewardModelConfig

log = logging.getLogger(__name__)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(x, y+) - r(x, y-)), averaged: the negative log-likelihood of the preferences
    under the Bradley-Terry model P(y+ > y-) = sigmoid(r+ - r-) (Ouyang et al. 2022, eq. 1).
    `logsigmoid` keeps it finite for large margins where log(sigmoid(.)) underflows."""
    return -F.logsigmoid(chosen - rejected).mean()


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores strictly higher (a tie counts as wrong)."""
    return (chosen > rejected).float().mean().item() if len(chosen) else float("nan")


class RewardModelTrainer:
    """Loads `base` with a fresh scalar head and trains it; a plain class, run in-process or in an actor."""

    def __init__(self, base_path: str, cfg: RewardModelConfig):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        dtype = torch_dtype(cfg.dtype)
        # rm.num_layers keeps only the lower blocks: the config saved with the model says so, and every
        # loader builds the same truncated model.
        depth = {"num_hidden_layers": cfg.num_layers} if cfg.num_layers else {}
        base_depth = AutoConfig.from_pretrained(base_path).get_text_config().num_hidden_layers
        if cfg.num_layers > base_depth:
            raise ValueError(f"rm.num_layers = {cfg.num_layers} but {base_path} has {base_depth} blocks; "
                             f"choose at most {base_depth} (0 keeps them all)")
        self.model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=dtype,
                                                                        **depth)
        self.model.config.reward_pooling = cfg.pooling
        configure_padding(self.tokenizer, self.model, base_path)
        self.model.to(cfg.device)
        head = [p for n, p in self.model.named_parameters() if n.startswith("score.")]
        if not head:
            raise ValueError(f"{base_path}: no `score` head found on {type(self.model).__name__}; the base "
                             f"must be a causal LM that transformers can load for sequence classification")
        self._freeze_lower_layers(cfg.train_layers)
        trunk = [p for n, p in self.model.named_parameters() if not n.startswith("score.") and p.requires_grad]
        # The head starts random while the trunk is pretrained: a larger step for the head lets it find
        # the direction quickly without the trunk drifting far (cf. InstructGPT's RM from an SFT model).
        self.optimizer = torch.optim.AdamW([{"params": trunk, "lr": cfg.lr},
                                            {"params": head, "lr": cfg.head_lr}], weight_decay=0.0)

    def _freeze_lower_layers(self, train_layers: int) -> None:
        """Train only the top `train_layers` transformer blocks (0 = all): backward then stops early,
        which on CPU is most of a step, and the frozen lower layers keep the base LM's features."""
        if train_layers == 0:
            return
        layers = self.model.base_model.layers
        if train_layers > len(layers):
            raise ValueError(f"rm.train_layers = {train_layers} but the base LM has {len(layers)} layers")
        for module in [self.model.base_model.embed_tokens, *layers[:len(layers) - train_layers]]:
            module.requires_grad_(False)

    def rewards(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """(B,) scalar reward of each (prompt, response), pooled as `rm.pooling` says."""
        with autocast(self.cfg.device, self.cfg.autocast):
            return conversation_rewards(self.model, self.tokenizer, prompts, responses, self.cfg.max_length,
                                        self.cfg.device)

    def _pair_rewards(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) rewards of the chosen and of the rejected responses, in one forward pass."""
        prompts = [p.prompt for p in pairs] * 2
        r = self.rewards(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        return r[:len(pairs)], r[len(pairs):]

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str], batch_size: int = 32) -> list[float]:
        """Rewards as the `Scorer` protocol gives them, so a model in training can label West-of-N samples
        (in the autocast dtype: fine for ranking, while the served model scores in float32)."""
        self.model.eval()
        return [r for start in range(0, len(prompts), batch_size)
                for r in self.rewards(prompts[start:start + batch_size], responses[start:start + batch_size]).tolist()]

    @torch.no_grad()
    def evaluate(self, pairs: list[PreferencePair], batch_size: int = 32) -> dict:
        """Held-out Bradley-Terry loss and pair accuracy."""
        self.model.eval()
        chosen, rejected = [], []
        for start in range(0, len(pairs), batch_size):
            c, r = self._pair_rewards(pairs[start:start + batch_size])
            chosen.append(c)
            rejected.append(r)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        return {"eval/loss": bradley_terry_loss(chosen, rejected).item(),
                "eval/accuracy": pair_accuracy(chosen, rejected),
                "eval/margin": (chosen - rejected).mean().item()}

    def train(self, pairs: list[PreferencePair], eval_pairs: list[PreferencePair]) -> list[dict]:
        """`cfg.epochs` passes over `pairs`; returns one metrics dict per epoch (held-out accuracy included)."""
        if not pairs:
            raise ValueError("no training pairs: the reward model needs at least one preference pair")
        cfg = self.cfg
        order = list(range(len(pairs)))
        rng = random.Random(cfg.seed)
        steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        # Linear decay to zero after a 5% warm-up: the usual schedule for RM fine-tuning.
        warmup = max(1, total // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
        history, progress = [], Progress("reward model", total, "steps", every_s=30.0)
        for epoch in range(1, cfg.epochs + 1):
            rng.shuffle(order)
            self.model.train()
            losses, accs = [], []
            for b in range(steps_per_epoch):
                batch = [pairs[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
                chosen, rejected = self._pair_rewards(batch)
                loss = bradley_terry_loss(chosen, rejected)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                schedule.step()
                losses.append(loss.item())
                accs.append(pair_accuracy(chosen.detach(), rejected.detach()))
                progress.advance(1, f"epoch {epoch}/{cfg.epochs}, loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                                    f"acc {sum(accs[-10:]) / len(accs[-10:]):.2f} (last 10 steps)")
            metrics = {"epoch": epoch, "train/loss": sum(losses) / len(losses),
                       "train/accuracy": sum(accs) / len(accs)}
            if eval_pairs:
                metrics.update(self.evaluate(eval_pairs))
            history.append(metrics)
            log.info("reward model: epoch %d/%d done | train loss %.3f acc %.3f | held-out loss %s acc %s",
                     epoch, cfg.epochs, metrics["train/loss"], metrics["train/accuracy"],
                     _fmt(metrics.get("eval/loss")), _fmt(metrics.get("eval/accuracy")))
        return history

    def save(self, path: str) -> str:
        """An HF directory (model + tokenizer) that `RewardModelScorer` and `model:<dir>` load."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
