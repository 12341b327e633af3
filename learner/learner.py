"""The PPO learner: policy with a value head, one `update` per batch of scored rollouts.

Critic choice: a scalar value head on the policy's last hidden state rather than a separate value
model. On a CPU the learner's forward/backward dominates a PPO step, and a separate critic of the same
size would double that cost and the optimiser memory. The price is that value-loss gradients reach the
shared trunk, so the value loss is weighted down (`ppo.vf_coef`) and the head gets its own, larger
learning rate.

Off-policy correction: the rollouts carry the log-probs of the policy that sampled them (the behaviour
policy: an older version with `train.max_staleness` >= 1, and vLLM's arithmetic in any case). The
learner recomputes log-probs at its current weights (the proximal policy) and, with `ppo.decoupled`,
weights each token by the truncated ratio of the two (learner/ppo_math.py, "off-policy correction").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from actors.rollout import RolloutBatch, collate
from learner import ppo_math
from learner.forward import autocast, response_forward, token_logprobs, torch_dtype

if TYPE_CHECKING:
    from cluster.config import PPOConfig

log = logging.getLogger(__name__)


class PPOLearner:
    def __init__(self, model_path: str, cfg: PPOConfig, *, temperature: float = 1.0, inference_dtype: str = "bfloat16"):
        """`cfg` is the run's PPOConfig; `temperature` the rollouts' sampling temperature; `inference_dtype`
        the generation workers' weight dtype, in which `weights()` publishes."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.temperature = temperature
        self.inference_dtype = torch_dtype(inference_dtype)
        self.policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(cfg.dtype)).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.policy.config.pad_token_id or 0
        hidden = self.policy.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1).to(self.device, torch_dtype(cfg.dtype))
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))  # as in lm-human-preferences
        torch.nn.init.zeros_(self.value_head.bias)
        self.optimizer = torch.optim.AdamW([
            {"params": self.policy.parameters(), "lr": cfg.lr},
            {"params": self.value_head.parameters(), "lr": cfg.value_lr},
        ], weight_decay=0.0)
        self.kl_ctl = ppo_math.make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.score_moments = ppo_math.RunningMoments()
        self.version = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _forward(self, mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprobs (B, T), values (B, T), logits (B, T, V)) of a minibatch's response tokens; log-probs
        and logits in float32."""
        with autocast(self.device, self.cfg.autocast):
            logits, hidden = response_forward(self.policy, mb.input_ids.to(self.device),
                                              mb.attention_mask.to(self.device), mb.response_ids.shape[1],
                                              self.temperature)
            values = self.value_head(hidden).squeeze(-1).float()
        return ppo_math.logprobs_from_logits(logits, mb.response_ids.to(self.device)), values, logits

    @torch.no_grad()
    def _proximal(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and values of the batch at the learner's current weights, before the update: the
        proximal policy that the PPO ratio is clipped against."""
        logprobs, values = [], []
        for start in range(0, len(batch.scores), self.cfg.minibatch_size):
            rows = torch.arange(start, min(start + self.cfg.minibatch_size, len(batch.scores)))
            lp, v, _ = self._forward(batch.select(rows))
            logprobs.append(lp.cpu())
            values.append(v.cpu())
        return torch.cat(logprobs), torch.cat(values)

    def _scores(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """The sequence scores PPO optimises: the reward server's, less `ppo.missing_eos_penalty` for a
        response cut off at the length limit, then normalised by the running moments if `ppo.reward_norm`."""
        scores = batch.scores - self.cfg.missing_eos_penalty * (~batch.finished).float()
        metrics = {}
        if self.cfg.reward_norm:
            self.score_moments.update(scores)
            scores = self.score_moments.normalise(scores)
            metrics = {"reward/running_mean": self.score_moments.mean, "reward/running_std": self.score_moments.std}
        return scores, {**metrics, "reward/optimised_mean": scores.mean().item()}

    def update(self, rollouts: list) -> dict:
        """One PPO update on a batch of scored rollouts; returns metrics and advances the policy version."""
        self.policy.train()
        batch = collate(rollouts, self.pad_id)
        mask = batch.response_mask
        prox_logprobs, old_values = self._proximal(batch)
        old_values = old_values * mask
        weights, offpolicy = ppo_math.truncated_importance_weights(prox_logprobs, batch.behaviour_logprobs, mask,
                                                                   self.cfg.is_cap)
        if not self.cfg.decoupled:
            weights = mask  # every token weighs 1: the proximal policy is taken for the behaviour policy
        scores, score_metrics = self._scores(batch)
        kl_coef = self.kl_ctl.value
        rewards, _ = ppo_math.shaped_rewards(scores, prox_logprobs, batch.ref_logprobs, mask, kl_coef)
        advantages, returns = ppo_math.gae(rewards, old_values, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask)

        totals: dict[str, list[float]] = {}
        B, mbs = len(rollouts), self.cfg.minibatch_size
        for _ in range(self.cfg.epochs):
            order = torch.randperm(B, generator=self.generator)
            for s in range(0, B, mbs):
                rows = order[s:s + mbs]
                stats = self._step(batch.select(rows), prox_logprobs[rows], old_values[rows], advantages[rows],
                                   returns[rows], weights[rows])
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v)

        kl_per_seq = ppo_math.weighted_kl(prox_logprobs, batch.ref_logprobs, weights, mask)
        self.kl_ctl.update(kl_per_seq.mean().item(), B)
        self.version += 1
        metrics = {k: sum(v) / len(v) for k, v in totals.items()}
        metrics.update({f"offpolicy/{k}": v.item() for k, v in offpolicy.items()})
        metrics.update(score_metrics)
        metrics.update({
            "kl/mean": kl_per_seq.mean().item(),
            "kl/coef": kl_coef,
            "rollout/score_mean": batch.scores.mean().item(),
            "rollout/score_std": batch.scores.std().item() if B > 1 else 0.0,
            "rollout/response_len": mask.sum(-1).mean().item(),
            "rollout/finished_frac": batch.finished.float().mean().item(),
            "value/mean": ppo_math.masked_mean(old_values, mask).item(),
            "version/learner": self.version,
            "learner/tokens": mask.sum().item(),
        })
        return metrics

    def _step(self, mb: RolloutBatch, prox_logprobs, old_values, advantages, returns, weights) -> dict[str, float]:
        """One optimiser step on a minibatch."""
        mask = mb.response_mask.to(self.device)
        logprobs, values, logits = self._forward(mb)
        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, prox_logprobs.to(self.device), advantages.to(self.device),
                                                 mask, self.cfg.clip, weights.to(self.device))
        vf_loss, vf_stats = ppo_math.value_loss(values, old_values.to(self.device), returns.to(self.device),
                                                mask, self.cfg.value_clip)
        loss = pg_loss + self.cfg.vf_coef * vf_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            list(self.policy.parameters()) + list(self.value_head.parameters()), self.cfg.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            entropy = ppo_math.masked_mean(ppo_math.entropy_from_logits(logits.detach()), mask)
        return {
            "loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "loss/total": loss.item(),
            "policy/entropy": entropy.item(), "policy/clip_frac": float(pg_stats["clip_frac"]),
            "policy/approx_kl": float(pg_stats["approx_kl"]), "policy/ratio_mean": float(pg_stats["ratio_mean"]),
            "value/clip_frac": float(vf_stats["clip_frac"]), "grad/norm": grad_norm.item(),
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """Policy weights with HF names in the generation workers' dtype: what one broadcast publishes."""
        return {k: v.detach().to("cpu", self.inference_dtype) for k, v in self.policy.state_dict().items()}

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of given responses (temperature 1) under the learner's weights (for tests that
        compare a worker's weights with the learner's after a sync)."""
        self.policy.eval()
        return token_logprobs(self.policy, prompt_ids, response_ids, pad_id=self.pad_id,
                              autocast_dtype=self.cfg.autocast)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations from the learner's own weights (for tests: compared with a worker's after a sync)."""
        self.policy.eval()
        out = []
        for ids in prompt_ids:
            seq = self.policy.generate(torch.tensor([ids], device=self.device), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=self.pad_id)
            out.append(seq[0, len(ids):].tolist())
        return out

    def save(self, path: str) -> str:
        """An HF model directory (loadable by transformers and vLLM) plus the value head."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        torch.save({"value_head": self.value_head.state_dict(), "version": self.version,
                    "kl_ctl": self.kl_ctl.state_dict()}, out / "value_head.pt")
        return str(out)

    def save_checkpoint(self, path: str) -> int:
        """Everything `load_checkpoint` needs to continue exactly: the policy (an HF directory under
        `policy/`, with the value head), the optimizer's moments, the KL controller, the running score
        moments, the version and the random state of the minibatch order. Returns the policy version."""
        out = Path(path)
        self.save(str(out / "policy"))
        torch.save({"optimizer": self.optimizer.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                    "score_moments": self.score_moments.state_dict(),
                    "version": self.version, "generator": self.generator.get_state(),
                    "torch_rng": torch.get_rng_state()}, out / "learner.pt")
        return self.version

    def load_checkpoint(self, path: str) -> int:
        """Continue from `save_checkpoint(path)`: its weights replace the ones the learner started from.
        Returns the policy version."""
        from safetensors.torch import load_file

        out = Path(path)
        weights = load_file(str(out / "policy" / "model.safetensors"))
        missing, unexpected = self.policy.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"checkpoint {out} does not fit the policy: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        head = torch.load(out / "policy" / "value_head.pt", map_location=self.device)
        self.value_head.load_state_dict(head["value_head"])
        # On the CPU: the random states must stay CPU byte tensors; the optimizer moves its moments itself.
        state = torch.load(out / "learner.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state.get("score_moments", {"count": 0, "mean": 0.0, "m2": 0.0}))
        self.version = state["version"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return self.version

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        """This actor's process id (the fault tests kill it)."""
        return os.getpid()
