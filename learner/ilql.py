"""Implicit Language Q-Learning (Snell et al. 2022; `rlhf ilql`): a policy learnt offline from replies and
their rewards, with no sampling and no reward calls while it trains.

Every reply token is an action a_t taken in the state s_t (the prompt and the reply so far), whose hidden
state h_t is the LM trunk's at the position that predicts a_t. Heads on h_t:
- two Q heads, Q_i(s_t, .) over the vocabulary, fitted to the TD target y_t = r_t + gamma V(s_{t+1}), the
  reward on the reply's last token (its end is terminal, so y = r there), and their target copies, moved
  toward them by Polyak averaging every `target_sync_every` steps (TRLX: a full copy every 10);
- a V head, fitted by expectile regression (`tau` > 0.5 leans toward the better actions) to the smaller of the
  two target Qs of the action taken: V approaches the value of the best actions the data shows, without ever
  asking Q about an action the data does not hold, which is what keeps it offline-safe;
- the CQL term, the cross-entropy of each Q head's values as logits against the action taken, which pushes
  down the Q of actions the data never took;
- the language-model term on the data's tokens, plain or weighted by exp(advantage) (`lm_term`).

Decoding perturbs the policy: logits + beta (Q - V), then top-k. V is the same for every token of a state, so
it drops out of the softmax; with linear Q heads without a bias, the perturbation is beta W_Q h, and the
perturbed policy is the base model with the LM head W + beta W_Q (the Qs averaged): `folded` writes that model,
which vLLM serves like any other. MLP heads (the paper's) are decoded here, in the learner (`decode`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from core.forward import logprobs_from_logits, padded_logprobs, response_forward
from core.rollout import pad
from core.rollout_records import RolloutDataError, ScoredReply
from learner.ppo_math import masked_mean
from learner.sft import encoded_rows, load_policy
from learner.trainer import Trainer, through

if TYPE_CHECKING:
    from core.config import ILQLConfig

log = logging.getLogger(__name__)


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """|tau - 1(diff < 0)| diff^2, elementwise, for diff = target - V: with tau > 0.5 an underestimate (diff > 0)
    costs more than an overestimate, so V settles at the tau-expectile of its targets."""
    weight = torch.where(diff >= 0, torch.full_like(diff, tau), torch.full_like(diff, 1.0 - tau))
    return weight * diff.pow(2)


def td_targets(values: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor, gamma: float) -> torch.Tensor:
    """y (B, T): gamma V(s_{t+1}) for the tokens before each reply's last, its reward r on the last (the reply's
    end is terminal), 0 past it. `values` (B, T) is V(s_t) of each token's state (detached here), `rewards` (B,),
    `lengths` (B,) the reply lengths in tokens."""
    values = values.detach()
    B, T = values.shape
    position = torch.arange(T, device=values.device).expand(B, -1)
    last = lengths.unsqueeze(1) - 1
    following = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    y = torch.where(position < last, gamma * following, torch.zeros_like(values))
    return torch.where(position == last, rewards.unsqueeze(1).to(values.dtype), y)


def cql_loss(q_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a Q head's values (B, T, V) read as logits against the actions taken (B, T), masked mean:
    log sum_a exp Q(s, a) - Q(s, a_t), which pushes down the Q of the actions the data does not hold."""
    ce = F.cross_entropy(q_logits.flatten(0, 1).float(), actions.flatten(), reduction="none").view_as(mask)
    return masked_mean(ce, mask)


@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, alpha: float) -> None:
    """target <- alpha source + (1 - alpha) target, parameter by parameter (alpha 1: a copy)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(1.0 - alpha).add_(s.detach(), alpha=alpha)


def make_head(hidden: int, out: int, kind: str, bias: bool) -> nn.Module:
    """A head on the trunk's hidden state whose output starts at 0 (so that a fresh ILQL model decodes as its
    base): `linear` (no hidden layer), or `mlp` (the paper's: hidden -> 2 hidden -> ReLU -> out)."""
    if kind == "linear":
        head = nn.Linear(hidden, out, bias=bias)
        last = head
    else:
        last = nn.Linear(2 * hidden, out, bias=bias)
        head = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), last)
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)
    return head


class ILQLHeads(nn.Module):
    """Q heads (one or two) over the vocabulary, their target copies, and the V head, on the trunk's hidden
    state. Linear Q heads have no bias, so that they fold into the LM head (`folded_lm_head`)."""

    def __init__(self, hidden: int, vocab: int, kind: str = "linear", two_qs: bool = True):
        super().__init__()
        self.kind = kind
        self.qs = nn.ModuleList(make_head(hidden, vocab, kind, bias=kind != "linear") for _ in range(1 + two_qs))
        self.target_qs = copy.deepcopy(self.qs).requires_grad_(False)
        self.v = make_head(hidden, 1, kind, bias=True)

    def forward(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(each Q head's values (..., V), each target Q's, V (...)) at the hidden states (..., H), in float32."""
        hidden = hidden.float()
        with torch.no_grad():
            targets = [q(hidden) for q in self.target_qs]
        return [q(hidden) for q in self.qs], targets, self.v(hidden).squeeze(-1)

    def perturbation(self, hidden: torch.Tensor) -> torch.Tensor:
        """What decoding adds to the logits, divided by beta (..., V): for MLP heads the paper's min_i target
        Q_i(s, .) - V(s); for linear heads mean_i Q_i(s, .), which is what folds into the LM head (the min of
        two linear maps is not linear, and V(s) shifts every logit of a state alike)."""
        hidden = hidden.float()
        if self.kind == "linear":
            return torch.stack([q(hidden) for q in self.qs]).mean(0)
        q = torch.stack([t(hidden) for t in self.target_qs]).min(0).values
        return q - self.v(hidden)

    def sync_targets(self, alpha: float) -> None:
        polyak(self.target_qs, self.qs, alpha)

    def folded_lm_head(self, lm_head: torch.Tensor, beta: float) -> torch.Tensor:
        """The LM head weight (V, H) of the perturbed policy: W + beta mean_i W_Qi (linear heads only). Its logits
        are the base's + beta mean_i Q_i(s, .); V(s) is a shift of every logit, which no softmax sees."""
        if self.kind != "linear":
            raise ValueError("only linear Q heads fold into the LM head; MLP heads are decoded by `decode`")
        q = torch.stack([head.weight for head in self.qs]).mean(0)
        return lm_head.float() + beta * q.float()


def ilql_losses(heads: ILQLHeads, hidden: torch.Tensor, lm_logprobs: torch.Tensor, actions: torch.Tensor,
                mask: torch.Tensor, rewards: torch.Tensor, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ILQL's loss on one batch: hidden (B, T, H) the states of the reply tokens, lm_logprobs (B, T) the LM's
    log-probs of the actions (B, T), mask (B, T) 1 on reply tokens, rewards (B,). `cfg`: tau, gamma, cql_scale,
    awac_scale, lm_term. Total = Q loss (each head against the TD target) + V loss (expectile) + cql_scale CQL
    + awac_scale LM term; the stats carry no gradient."""
    qs, targets, v = heads(hidden)
    chosen = [q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) for q in qs]
    target_q = torch.stack([t.gather(-1, actions.unsqueeze(-1)).squeeze(-1) for t in targets]).min(0).values
    y = td_targets(v, rewards, mask.sum(-1).long(), cfg.gamma)
    loss_q = sum(masked_mean((q - y).pow(2), mask) for q in chosen)
    loss_v = masked_mean(expectile_loss(target_q - v, cfg.tau), mask)
    loss_cql = sum(cql_loss(q, actions, mask) for q in qs)
    nll = -lm_logprobs
    if cfg.lm_term == "advantage":  # AWAC: the data's tokens weighted by how much better than V they are
        nll = nll * torch.exp(target_q - v.detach()).clamp(max=20.0)
    loss_lm = masked_mean(nll, mask)
    total = loss_q + loss_v + cfg.cql_scale * loss_cql + cfg.awac_scale * loss_lm
    with torch.no_grad():
        stats = {"loss_q": loss_q, "loss_v": loss_v, "loss_cql": loss_cql, "loss_lm": loss_lm,
                 "q_mean": masked_mean(chosen[0], mask), "v_mean": masked_mean(v, mask),
                 "advantage_mean": masked_mean(target_q - v, mask)}
    return total, stats


def batch_states(model, examples: list[tuple[list[int], list[int], float]], pad_id: int, autocast_dtype: str,
                 forward=response_forward):
    """(hidden (B, T, H) of each reply token's state, LM log-probs (B, T) of the reply tokens, the reply tokens
    (B, T), mask (B, T), rewards (B,)) of (prompt ids, reply ids, reward) rows: one forward of the policy."""
    input_ids, attention_mask, reply_ids, mask = pad([p for p, _, _ in examples], [r for _, r, _ in examples],
                                                     pad_id)
    logprobs, hidden, _ = padded_logprobs(model, input_ids, attention_mask, reply_ids, autocast_dtype=autocast_dtype,
                                          forward=forward)
    device = logprobs.device
    rewards = torch.tensor([r for _, _, r in examples], dtype=torch.float32, device=device)
    return hidden, logprobs, reply_ids.to(device), mask.to(device), rewards


@torch.no_grad()
def decode(model, heads: ILQLHeads, prompts: list[list[int]], *, beta: float, top_k: int, temperature: float,
           max_new_tokens: int, eos_ids: set[int], pad_id: int, generator: torch.Generator | None = None
           ) -> list[list[int]]:
    """Sampled replies (token ids, the end-of-turn token included when reached) to `prompts` under the perturbed
    policy softmax((logits + beta perturbation) / temperature) cut to its `top_k` tokens (0: all), with a
    key/value cache: the paper's decoding, for heads that do not fold into the LM head."""
    device = next(model.parameters()).device
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], attention[i, P - len(p):] = torch.tensor(p, device=device), 1
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    replies: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache, step_ids, positions = None, ids, (attention.cumsum(-1) - 1).clamp(min=0)
    for _ in range(max_new_tokens):
        out = decoder(input_ids=step_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                      use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1].float()
        scores = F.linear(hidden, head.weight.float()) + beta * heads.perturbation(hidden)
        if 0 < top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores / max(temperature, 1e-6), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for i in torch.nonzero(~done).flatten().tolist():
            replies[i].append(int(token[i]))
        done |= torch.tensor([t in eos_ids for t in token.tolist()], device=device)
        if bool(done.all()):
            break
        step_ids, positions = token.unsqueeze(1), positions[:, -1:] + 1
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    return replies


@torch.no_grad()
def perturbed_logprobs(model, heads: ILQLHeads, examples: list[tuple[list[int], list[int]]], *, beta: float,
                       temperature: float, pad_id: int, autocast_dtype: str = "none", micro_batch: int = 16
                       ) -> tuple[list[list[float]], list[list[float]]]:
    """(log-prob of each reply token, the largest probability at its position) under the perturbed policy
    softmax((logits + beta perturbation) / temperature) over the whole vocabulary (no top-k), one list per
    (prompt ids, reply ids) row. The largest probabilities show a degenerate beta (all mass on one token)."""
    logprobs_out, top_out = [], []
    for start in range(0, len(examples), micro_batch):
        rows = examples[start:start + micro_batch]
        input_ids, attention_mask, reply_ids, _ = pad([p for p, _ in rows], [r for _, r in rows], pad_id)
        _, hidden, logits = padded_logprobs(model, input_ids, attention_mask, reply_ids, autocast_dtype=autocast_dtype)
        scores = (logits + beta * heads.perturbation(hidden)) / temperature
        logprobs = logprobs_from_logits(scores, reply_ids.to(scores.device)).cpu()
        top = torch.softmax(scores, dim=-1).max(-1).values.cpu()
        logprobs_out += [lp[:len(r)].tolist() for lp, (_, r) in zip(logprobs, rows)]
        top_out += [t[:len(r)].tolist() for t, (_, r) in zip(top, rows)]
    return logprobs_out, top_out


# One encoded scored reply: (prompt ids, reply ids, reward)
Example = tuple[list[int], list[int], float]


class ILQLTrainer(Trainer):
    """The policy and its ILQL heads trained together on scored replies (learner/trainer.py's loop); the target
    Qs synced every `target_sync_every` optimiser steps."""

    name = "ilql"
    cfg: ILQLConfig

    def __init__(self, model_path: str, cfg: ILQLConfig):
        model, tokenizer = load_policy(model_path, cfg, self.name)
        self.heads = ILQLHeads(model.config.hidden_size, model.get_output_embeddings().weight.shape[0], cfg.heads,
                               cfg.two_qs).to(model.device)
        super().__init__(cfg, model, tokenizer)
        self.pad_id = model.config.pad_token_id or 0

    def _losses(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden, logprobs, actions, mask, rewards = batch_states(self.lm, batch, self.pad_id, self.cfg.autocast,
                                                                forward=through)
        return ilql_losses(self.heads, hidden, logprobs, actions, mask, rewards, self.cfg)

    def size(self, example) -> int:
        return len(example[1])  # the loss is a mean over reply tokens

    def loss(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        self.heads.train()
        loss, stats = self._losses(batch)
        return loss, {f"train/{k}": v.item() for k, v in stats.items()}

    def after_step(self) -> None:
        if self.steps % self.cfg.target_sync_every == 0:
            self.heads.sync_targets(self.cfg.polyak)

    def param_groups(self) -> list[dict]:
        return [{**super().param_groups()[0], "lr": self.cfg.lr},
                {"params": [p for p in self.heads.parameters() if p.requires_grad], "lr": self.cfg.head_lr}]

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"heads": self.heads}

    def evaluate(self, examples: list[Example]) -> dict[str, float]:
        """The held-out losses, weighted by replies."""
        self.heads.eval()
        return self.held_out_means(examples, self._losses)

    def save(self, path: str) -> str:
        """`path`: the heads (`ilql_heads.pt`, with what decoding needs) and, for linear heads, the perturbed
        policy as an HF directory (the LM head W + beta W_Q, untied from the embeddings); for MLP heads the
        trained base model, which `decode` perturbs with the heads."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.merge_adapters()
        torch.save({"state": self.heads.state_dict(), "kind": self.cfg.heads, "two_qs": self.cfg.two_qs,
                    "beta": self.cfg.beta, "top_k": self.cfg.top_k}, out / HEADS_FILE)
        if self.cfg.heads == "linear":
            return self.save_folded(path, self.cfg.beta)
        return super().save(path)

    def save_folded(self, path: str, beta: float) -> str:
        """The perturbed policy at `beta` as an HF directory `path` (linear heads)."""
        folded(self.model, self.heads, beta).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path


HEADS_FILE = "ilql_heads.pt"


def folded(model, heads: ILQLHeads, beta: float):
    """A copy of `model` whose LM head is the perturbed policy's (`ILQLHeads.folded_lm_head`), untied from the
    input embeddings: an ordinary causal LM that samples as logits + beta (Q - V) would."""
    copy_ = copy.deepcopy(model)
    weight = heads.folded_lm_head(model.get_output_embeddings().weight.detach(), beta)
    copy_.config.tie_word_embeddings = False
    if hasattr(copy_.config, "get_text_config"):
        copy_.config.get_text_config().tie_word_embeddings = False
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=model.dtype, device=model.device)
    head.weight = nn.Parameter(weight.to(model.dtype))
    copy_.set_output_embeddings(head)
    return copy_


def encode_scored(replies: list[ScoredReply], tokenizer, max_length: int, source: str, on_bad_row: str
                  ) -> list[Example]:
    """(prompt ids, reply ids, reward) of each scored reply (learner/sft.py `encoded_rows`)."""
    encoded = [(prompt, ids, reply.reward) for reply, prompt, ids in
               encoded_rows(replies, tokenizer, max_length, source, on_bad_row, "ilql", RolloutDataError)]
    if not encoded:
        raise RolloutDataError(f"{source}: no scored reply is left to train on: each is over ilql.max_length = "
                               f"{max_length} tokens")
    return encoded
