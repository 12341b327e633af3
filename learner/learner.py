"""The PPO learner: `update` on each batch of scored rollouts, reading top to bottom as
proximal pass -> scores -> advantages -> minibatch steps -> KL controller.

The default job runs it as GRPO (no value head: `ppo.advantage=grpo`, learner/estimators.py) with the frozen
reference in this process (`reference.placement=learner`, learner/reference_source.py), so the update's first
pass computes both the proximal policy's and the reference's log-probs. What it trains is built in
learner/policy.py; how its versions reach the workers in learner/publication.py; its state on disk in
learner/learner_state.py. One learner may be one rank of a group (learner/learner_group.py): then every rank
runs the same calls and trains on its share of every minibatch.

Off-policy correction: the rollouts carry the log-probs of the policy that sampled them (the behaviour
policy: an older version with `train.max_staleness` >= 1, and vLLM's arithmetic in any case). The
learner recomputes log-probs at its current weights (the proximal policy) and, with `ppo.decoupled`,
weights each token by the truncated ratio of the two (learner/ppo_math.py, "off-policy correction").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.forward import padded_logprobs, token_logprobs, torch_dtype
from core.rollout import RolloutBatch, collate
from core.weights import BroadcastWeights, PublishedWeights
from learner import distributed, learner_state, ppo_math, publication
from learner.estimators import ESTIMATORS
from learner.policy import build_policy
from learner.reference_source import ReferenceSource, _whole_model
from learner.sft import held_out_nll, reply_nll

if TYPE_CHECKING:
    from core.config import PPOConfig


@dataclass
class LearnerSetup:
    """What a learner takes from the rest of the run besides its PPOConfig."""

    temperature: float = 1.0  # the rollouts' sampling temperature
    max_new_tokens: int | None = None  # their length limit (the constant of ppo.loss_agg=seq_mean_token_sum_norm)
    inference_dtype: str = "bfloat16"  # the generation workers' weight dtype, in which publish() sends the weights
    reference: bool = False  # hold a frozen copy of the initial policy as the reference (reference.placement=learner)
    rank: int = 0  # this learner's rank in a learner group of world_size ranks,
    world_size: int = 1  # joined at the rendezvous (tcp://host:port); with several ranks the model is sharded
    rendezvous: str | None = None


class PPOLearner:
    def __init__(self, model_path: str, cfg: PPOConfig, setup: LearnerSetup | None = None,
                 ptx: list[tuple[list[int], list[int]]] | None = None):
        """`cfg` is the run's PPOConfig, `setup` the rest (LearnerSetup). `ptx`: encoded demonstrations (prompt
        ids, reply ids) whose log-likelihood `cfg.ptx_coef` mixes into every minibatch (PPO-ptx)."""
        setup = setup or LearnerSetup()
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.cfg, self.setup = cfg, setup
        self.device = torch.device(cfg.device)
        self.rank, self.world = setup.rank, setup.world_size
        if setup.rendezvous:
            distributed.init_group(setup.rendezvous, self.rank, self.world, self.device, cfg.collective_timeout_s)
        self.temperature = setup.temperature
        self.inference_dtype = torch_dtype(setup.inference_dtype)
        self.trained = build_policy(model_path, cfg, self.device, self.world)
        self.policy, self.model, self.value_head = self.trained.lm, self.trained.module, self.trained.value_head
        self.tokenizer, self.pad_id = self.trained.tokenizer, self.trained.pad_id
        self.reference = ReferenceSource.of(self.trained, model_path, cfg, self.world, setup.reference)
        self.optimizer = self.trained.optimizer(cfg)
        self.publisher = publication.ObjectStorePublisher(self.trained, self.inference_dtype, cfg.publish_bucket_mb,
                                                          self.rank)
        self.kl_ctl = ppo_math.make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.score_moments = ppo_math.RunningMoments()
        self.version = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.ptx, self.ptx_next = (ptx or []) if cfg.ptx_coef > 0 else [], 0

    # --- the update ------------------------------------------------------------------------------

    def update(self, rollouts: list) -> dict:
        """One PPO update on a batch of scored rollouts; returns metrics and advances the policy version."""
        self.policy.train()
        batch = collate(rollouts, self.pad_id, with_reference=not self.reference.held)
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
        in_reward, in_loss = (kl_coef, 0.0) if self.cfg.kl_in == "reward" else (0.0, kl_coef)
        kl = ppo_math.kl_k1(prox_logprobs, batch.ref_logprobs) * mask
        advantages, returns = ESTIMATORS[self.cfg.advantage](scores, kl, in_reward, old_values, mask, batch.groups,
                                                             self.cfg)
        steps = []
        for _ in range(self.cfg.epochs):
            order = self._grouped_order(batch.groups)
            for s in range(0, len(rollouts), self.cfg.minibatch_size):
                rows = order[s:s + self.cfg.minibatch_size]
                steps.append(self._step(batch.select(rows), prox_logprobs[rows], old_values[rows], advantages[rows],
                                        returns[rows], weights[rows], in_loss))

        measured_kl = self.reference.computes(self.cfg.kl_coef) or not self.reference.held
        kl_per_seq = ppo_math.weighted_kl(prox_logprobs, batch.ref_logprobs, weights, mask)
        self.kl_ctl.update(kl_per_seq.mean().item() if measured_kl else 0.0, len(rollouts))
        self.version += 1
        return learner_state.update_metrics(
            steps, batch, offpolicy, score_metrics, advantages, kl_per_seq if measured_kl else None, kl_coef,
            old_values if self.value_head is not None else None, self.version)

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
        reference = self.reference.computes(self.cfg.kl_coef)
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
                with self.reference.module() as module:
                    out[2, rows] = self._forward(mb, module)[0].cpu()
        out = distributed.sum_across_ranks(out.to(self.device)).cpu()
        return out[0] if own else batch.behaviour_logprobs, out[1], out[2] if reference else batch.ref_logprobs

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
        share = (self.world * mb.response_mask[mine].sum() / mb.response_mask.sum().clamp(min=1.0)).to(self.device)
        pg_share = share if self.cfg.loss_agg == "token_mean" else torch.tensor(self.world * len(mine) / len(mb.scores),
                                                                                device=self.device)
        prox_logprobs, old_values, advantages, returns, weights, ref_logprobs = (
            t[mine].to(self.device) for t in (prox_logprobs, old_values, advantages, returns, weights,
                                              mb.ref_logprobs))
        mb = mb.select(mine)
        mask = mb.response_mask.to(self.device)
        logprobs, values, logits = self._forward(mb)
        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, prox_logprobs, advantages, mask, self.cfg.clip, weights,
                                                 self.cfg.loss_agg, self.setup.max_new_tokens)
        # each term: (loss, its rank's weight, its coefficient); summed over the ranks, the one-learner figure
        terms = {"loss/policy": (pg_loss, pg_share, 1.0)}
        stats = {"policy/clip_frac": pg_stats["clip_frac"], "policy/approx_kl": pg_stats["approx_kl"],
                 "policy/ratio_mean": pg_stats["ratio_mean"]}
        if kl_coef > 0:
            # GRPO's KL term (Shao et al. 2024, eq. 4), on the tokens as the policy loss weighs them
            kl = ppo_math.aggregate(ppo_math.kl_k3(logprobs, ref_logprobs) * weights, mask, self.cfg.loss_agg,
                                    self.setup.max_new_tokens)
            terms["loss/kl"] = (kl, pg_share, kl_coef)
        if self.value_head is not None:
            vf_loss, vf_stats = ppo_math.value_loss(values, old_values, returns, mask, self.cfg.value_clip)
            terms["loss/value"] = (vf_loss, share, self.cfg.vf_coef)
            stats["value/clip_frac"] = vf_stats["clip_frac"]
        if self.ptx:
            terms["loss/ptx"] = (*self._ptx_loss(), self.cfg.ptx_coef)
        self.optimizer.zero_grad(set_to_none=True)
        sum(coef * term * weight for term, weight, coef in terms.values()).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), self.cfg.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            stats["policy/entropy"] = ppo_math.masked_mean(ppo_math.entropy_from_logits(logits.detach()), mask)
        return {**learner_state.summed_over_ranks(stats, share, terms, self.world),
                "grad/norm": distributed.local(grad_norm).item()}

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

    def _forward(self, mb: RolloutBatch, model=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprobs (B, T), values (B, T), logits (B, T, V)) of a minibatch's response tokens under the
        policy (or `model`); log-probs and logits in float32."""
        return padded_logprobs(model or self.model, mb.input_ids, mb.attention_mask, mb.response_ids,
                               temperature=self.temperature, autocast_dtype=self.cfg.autocast, forward=_whole_model)

    def _my_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of a minibatch's rows (all of them for a single learner): a contiguous slice, so
        that the samples of one prompt stay together and share its forward (core/forward.py)."""
        return rows.tensor_split(self.world)[self.rank]

    def _grouped_order(self, groups: torch.Tensor) -> torch.Tensor:
        """The batch's rows in a random order of their groups, each group's rows together: minibatches then hold
        whole groups, whose samples share their prompt's forward."""
        _, group_of_row = torch.unique(groups, return_inverse=True)
        group_rank = torch.randperm(int(group_of_row.max()) + 1, generator=self.generator)
        return torch.argsort(group_rank[group_of_row], stable=True)

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

    # --- weights out -----------------------------------------------------------------------------

    @torch.no_grad()
    def publish(self) -> PublishedWeights | BroadcastWeights | None:
        """The current version for the workers (learner/publication.py): on rank 0, None on the others (every
        rank of a group must call it)."""
        return self.publisher.publish(self.version)

    def open_weight_transfer(self, workers: list) -> None:
        """`ppo.weight_transfer=nccl`: every later `publish()` broadcasts over NCCL into these generation
        workers' engines (actor handles). Every rank must call it."""
        self.publisher = publication.NcclPublisher(self.trained, self.inference_dtype, self.rank, workers,
                                                   self.device)

    def weight_source(self):
        """What the NCCL engine sends, as vLLM's WeightSource (learner/publication.py)."""
        return publication.weight_source(self.trained, self.inference_dtype, self.device)

    def weights(self) -> dict[str, torch.Tensor]:
        """Policy weights with HF names in the generation workers' dtype, as one state dict (on rank 0; every
        rank of a group must call it): for tests that compare learners."""
        return {k: v.to(self.inference_dtype) for k, v in self.trained.full_state()[0].items()}

    # --- log-probs for others --------------------------------------------------------------------

    def ref_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                     temperature: float | None = None) -> list[list[float]]:
        """A learner that holds the reference model answers for it (the reference actor's interface,
        actors/reference.py): the reference log-prob of every response token, one list per row."""
        return self.reference.logprobs(prompt_ids, response_ids, temperature or self.temperature)

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of given responses (temperature 1) under the learner's weights (for tests that
        compare a worker's weights with the learner's after a sync)."""
        self.policy.eval()
        return token_logprobs(self.policy, prompt_ids, response_ids, pad_id=self.pad_id,
                              autocast_dtype=self.cfg.autocast)

    def perplexity(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, float]:
        """The policy's NLL per reply token of held-out demonstrations and its perplexity (every rank of a
        group computes them all, as a sharded forward needs)."""
        self.policy.eval()
        return held_out_nll(self.model, examples, self.pad_id, self.cfg.autocast, self.cfg.minibatch_size,
                            forward=_whole_model)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations from the learner's own weights (for tests: compared with a worker's after a sync)."""
        self.policy.eval()
        return [self.policy.generate(torch.tensor([ids], device=self.device), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=self.pad_id)[0, len(ids):].tolist()
                for ids in prompt_ids]

    # --- state -----------------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """An HF model directory (loadable by transformers and vLLM) plus the value head, written by rank 0
        (every rank of a group must call it)."""
        return learner_state.save_policy(self, path)

    def save_checkpoint(self, path: str) -> int:
        """A checkpoint that any number of ranks can continue from (learner/learner_state.py) -> the version."""
        return learner_state.save_checkpoint(self, path)

    def load_checkpoint(self, path: str, reward_state: bool = True) -> int:
        """Continue from `save_checkpoint(path)`, written by this or another number of ranks; without
        `reward_state` the KL controller and the running score moments start afresh (the checkpoint was trained
        on another reward). Returns the policy version."""
        return learner_state.load_checkpoint(self, path, reward_state)

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds of the weights, the gradients and the optimizer state (its shards)."""
        return learner_state.memory(self)

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        """This actor's process id (the fault tests kill it)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()
