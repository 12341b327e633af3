"""The data contract between the roles: one sampled response (`Rollout`) and a padded batch of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """One response sampled by a generation worker, later scored and given reference log-probs."""

    prompt_index: int  # the prompt's index in its split
    prompt_ids: list[int]  # chat-formatted prompt tokens
    response_ids: list[int]  # sampled tokens, EOS included when the response finished
    text: str  # the response, decoded
    logprobs: list[float]  # behaviour policy's log-prob of each response token (from vLLM)
    version: int  # policy version that generated it
    worker: str  # name of the generation worker
    finished: bool  # ended with EOS rather than the length limit
    score: float | None = None  # reward server's scalar for the whole response
    ref_logprobs: list[float] | None = field(default=None, repr=False)  # frozen reference, per token
    draw: int = -1  # serial number of the prompt draw it answers (set by the rollout stream)


@dataclass
class RolloutBatch:
    """Rollouts padded into tensors: prompts left-padded to P, responses right-padded to T."""

    input_ids: torch.Tensor  # (B, P + T) prompt then response token ids
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1.0 on response tokens, 0.0 on padding
    response_ids: torch.Tensor  # (B, T) response token ids (pad where masked)
    behaviour_logprobs: torch.Tensor  # (B, T) vLLM's log-probs of the sampled tokens
    ref_logprobs: torch.Tensor  # (B, T) reference model's log-probs of the same tokens
    scores: torch.Tensor  # (B,) reward of each response
    versions: torch.Tensor  # (B,) policy version that produced each row

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(**{name: getattr(self, name)[rows] for name in self.__dataclass_fields__})


def pad_tokens(rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(input_ids (B, P+T), attention_mask (B, P+T), response_ids (B, T), response_mask (B, T)):
    prompts left-padded to P so that every row's response starts at the same column."""
    P = max(len(r.prompt_ids) for r in rollouts)
    T = max(len(r.response_ids) for r in rollouts)
    input_ids = torch.full((len(rollouts), P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(rollouts), T))
    for i, r in enumerate(rollouts):
        p, t = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, P - p:P] = torch.tensor(r.prompt_ids)
        input_ids[i, P:P + t] = torch.tensor(r.response_ids, dtype=torch.long)
        attention_mask[i, P - p:P + t] = 1
        response_mask[i, :t] = 1.0
    return input_ids, attention_mask, input_ids[:, P:].clone(), response_mask


def _pad_floats(rows: list[list[float]], T: int) -> torch.Tensor:
    out = torch.zeros((len(rows), T))
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def collate(rollouts: list[Rollout], pad_id: int) -> RolloutBatch:
    """Pad scored rollouts into one batch; every rollout must carry a score and reference log-probs."""
    missing = [r.prompt_index for r in rollouts if r.score is None or r.ref_logprobs is None]
    if missing:
        raise ValueError(f"rollouts for prompts {missing[:5]} lack a score or reference log-probs")
    input_ids, attention_mask, response_ids, response_mask = pad_tokens(rollouts, pad_id)
    T = response_ids.shape[1]
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
        response_ids=response_ids, behaviour_logprobs=_pad_floats([r.logprobs for r in rollouts], T),
        ref_logprobs=_pad_floats([r.ref_logprobs for r in rollouts], T),
        scores=torch.tensor([r.score for r in rollouts], dtype=torch.float32),
        versions=torch.tensor([r.version for r in rollouts]))


def response_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) for the response tokens of a left-padded batch, and the hidden states (B, T, H)
    they came from (the value head reads those).

    The LM head runs on the response positions only: the prompt's logits are never needed, and at a
    49k vocabulary they would be most of the memory. Logits are divided by the sampling temperature
    so that log-probs match what the generation workers sampled from.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state
    # position P-1+t predicts response token t
    hidden = hidden[:, -response_len - 1:-1]
    logits = model.get_output_embeddings()(hidden)
    return logits.float() / temperature, hidden
