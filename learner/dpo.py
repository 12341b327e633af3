"""Direct Preference Optimization (Rafailov et al. 2023; `rlhf dpo`): the policy trained on preference pairs
directly, with no reward model and no sampling.

For a pair (x, y_w preferred to y_l) the implicit reward of a reply is r(y) = beta * (log pi(y|x) -
log pi_ref(y|x)), summed over the reply's tokens, and the loss is -log sigmoid(r(y_w) - r(y_l)): the
Bradley-Terry likelihood of the label under that reward. The reference is the policy DPO starts from;
its log-probs are computed once, before training, by the reference model (actors/reference.py) and the
policy is trained in this process as `rlhf sft` is.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from actors.reference import ReferenceModel
from core.demonstrations import raise_or_skip
from core.forward import reply_logprobs
from core.preferences import PreferenceDataError, PreferencePair
from learner.sft import encode_reply, load_policy
from learner.trainer import Trainer, through

if TYPE_CHECKING:
    from core.config import DPOConfig

log = logging.getLogger(__name__)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's loss (eq. 7) from the summed reply log-probs (B,) of the chosen and rejected replies under the
    policy and the reference: mean over pairs of -log sigmoid(r_w - r_l), r = beta * (log pi - log pi_ref).
    Stats (detached): the implicit rewards' accuracy (r_w > r_l), mean margin r_w - r_l, and means of r_w
    and r_l."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        stats = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                 "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}
    return loss, stats


# One encoded pair: (prompt ids, chosen reply ids, rejected reply ids, reference log-prob of chosen, of rejected)
EncodedPair = tuple[list[int], list[int], list[int], float, float]


def encode_pairs(pairs: list[PreferencePair], tokenizer, max_length: int, source: str,
                 on_bad_row: str = "error") -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) per pair in the policy's layout (`encode_reply`); a pair whose
    longer reply takes it over `max_length` tokens is a bad row."""
    encoded, problems = [], []
    for pair in pairs:
        prompt, chosen = encode_reply(tokenizer, pair.prompt, pair.chosen, pair.chosen_finished)
        _, rejected = encode_reply(tokenizer, pair.prompt, pair.rejected, pair.rejected_finished)
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            problems.append(f"row {pair.row}: {len(prompt)} prompt + {max(len(chosen), len(rejected))} reply "
                            f"tokens, over dpo.max_length = {max_length}")
            continue
        encoded.append((prompt, chosen, rejected))
    raise_or_skip(source, problems, len(pairs), on_bad_row, "preferences.on_bad_row", PreferenceDataError)
    return encoded


def with_reference(pairs: list[tuple[list[int], list[int], list[int]]], reference: ReferenceModel) -> list[EncodedPair]:
    """Each pair with the reference's summed log-probs of its two replies (temperature 1)."""
    prompts = [p for p, _, _ in pairs]
    chosen = reference.ref_logprobs(prompts, [c for _, c, _ in pairs], temperature=1.0)
    rejected = reference.ref_logprobs(prompts, [r for _, _, r in pairs], temperature=1.0)
    return [(p, c, r, sum(lc), sum(lr)) for (p, c, r), lc, lr in zip(pairs, chosen, rejected)]


class DPOTrainer(Trainer):
    name = "dpo"
    cfg: DPOConfig

    def __init__(self, model_path: str, cfg: DPOConfig):
        super().__init__(cfg, *load_policy(model_path, cfg, self.name))
        self.pad_id = self.model.config.pad_token_id or 0

    def _sums(self, prompts: list[list[int]], replies: list[list[int]]) -> torch.Tensor:
        logprobs, mask = reply_logprobs(self.lm, list(zip(prompts, replies)), self.pad_id, self.cfg.autocast,
                                        forward=through)
        return torch.where(mask.bool(), logprobs, 0.0).sum(-1)

    def _pair_loss(self, batch: list[EncodedPair]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prompts = [p for p, *_ in batch]
        # chosen and rejected replies in one forward
        sums = self._sums(prompts + prompts, [c for _, c, *_ in batch] + [r for _, _, r, *_ in batch])
        ref = torch.tensor([[c, r] for *_, c, r in batch], device=sums.device)
        return dpo_loss(sums[:len(batch)], sums[len(batch):], ref[:, 0], ref[:, 1], self.cfg.beta)

    def loss(self, batch: list[EncodedPair]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = self._pair_loss(batch)
        return loss, {f"train/{k}": v.item() for k, v in stats.items()}

    def evaluate(self, pairs: list[EncodedPair]) -> dict[str, float]:
        """Held-out loss, implicit-reward accuracy and margin, weighted by pairs."""
        return self.held_out_means(pairs, self._pair_loss)
