"""Reward-model training: a scalar head on a base LM, fitted to preference pairs with the
Bradley-Terry loss, judged by held-out pair accuracy after every epoch.

The saved directory is an ordinary `AutoModelForSequenceClassification` (num_labels=1) plus its
tokenizer, which the reward server's `model:<dir>` scorer loads unchanged; both encode a pair with
`conversation_rewards`, so the model is scored on exactly the text and pooling it was trained with.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from core.forward import autocast, torch_dtype
from core.preferences import PreferencePair
from learner.trainer import Trainer, seed_and_threads
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


class RewardModelTrainer(Trainer):
    """Loads `base` with a fresh scalar head and trains it on preference pairs (learner/trainer.py's loop)."""

    name = "reward model"
    evaluate_first = False
    warmup_decay = True

    def __init__(self, base_path: str, cfg: RewardModelConfig):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        seed_and_threads(cfg)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        dtype = torch_dtype(cfg.dtype)
        # rm.num_layers keeps only the lower blocks: the config saved with the model says so, and every
        # loader builds the same truncated model.
        depth = {"num_hidden_layers": cfg.num_layers} if cfg.num_layers else {}
        base_depth = AutoConfig.from_pretrained(base_path).get_text_config().num_hidden_layers
        if cfg.num_layers > base_depth:
            raise ValueError(f"rm.num_layers = {cfg.num_layers} but {base_path} has {base_depth} blocks; "
                             f"choose at most {base_depth} (0 keeps them all)")
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=dtype, **depth)
        model.config.reward_pooling = cfg.pooling
        configure_padding(tokenizer, model, base_path)
        model.to(cfg.device)
        head = [p for n, p in model.named_parameters() if n.startswith("score.")]
        if not head:
            raise ValueError(f"{base_path}: no `score` head found on {type(model).__name__}; the base "
                             f"must be a causal LM that transformers can load for sequence classification")
        _freeze_lower_layers(model, cfg.train_layers)
        super().__init__(cfg, model, tokenizer)

    def param_groups(self) -> list[dict]:
        # The head starts random while the trunk is pretrained: a larger step for the head lets it find
        # the direction quickly without the trunk drifting far (cf. InstructGPT's RM from an SFT model).
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if not n.startswith("score.")], "lr": self.cfg.lr},
                {"params": [p for n, p in named if n.startswith("score.")], "lr": self.cfg.head_lr}]

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

    def loss(self, batch: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self._pair_rewards(batch)
        return bradley_terry_loss(chosen, rejected), {"train/accuracy": pair_accuracy(chosen.detach(),
                                                                                      rejected.detach())}


def _freeze_lower_layers(model, train_layers: int) -> None:
    """Train only the top `train_layers` transformer blocks (0 = all): backward then stops early, which on CPU
    is most of a step, and the frozen lower layers keep the base LM's features."""
    if train_layers == 0:
        return
    layers = model.base_model.layers
    if train_layers > len(layers):
        raise ValueError(f"rm.train_layers = {train_layers} but the base LM has {len(layers)} layers")
    for module in [model.base_model.embed_tokens, *layers[:len(layers) - train_layers]]:
        module.requires_grad_(False)
