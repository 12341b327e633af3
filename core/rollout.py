"""The data contract between the roles: one sampled response (`Rollout`) and a padded batch of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """One response sampled by a generation worker; the rollout stream attaches its score and the reference
    log-probs in one place once both are in (`RolloutStream._scored`), and its prompt draw number."""

    prompt_index: int  # the prompt's index in its split
    prompt_ids: list[int]  # chat-formatted prompt tokens
    response_ids: list[int]  # sampled tokens, EOS included when the response finished
    text: str  # the response, decoded
    logprobs: list[float]  # behaviour policy's log-prob of each response token (from vLLM)
    version: int  # policy version that sampled its first token (the oldest of its tokens)
    worker: str  # name of the generation worker
    finished: bool  # ended with EOS rather than the length limit
    score: float | None = None  # reward server's scalar for the whole response
    ref_logprobs: list[float] | None = field(default=None, repr=False)  # frozen reference, per token
    draw: int = -1  # serial number of the prompt draw it answers (see actors/prompt_ledger.py)
    # the version that sampled each response token, where they differ (`generation.inflight_updates`: a new
    # version loaded while the reply was being sampled); None: every token is of `version`
    token_versions: list[int] | None = field(default=None, repr=False)
    # a conversation (core/environment.py): 1 on the tokens the policy sampled, 0 on the environment's messages
    # between its replies (the learner trains on the first only); None: every response token is the policy's
    policy_mask: list[int] | None = field(default=None, repr=False)

    def versions(self) -> list[int]:
        """The policy version that sampled each response token."""
        return self.token_versions or [self.version] * len(self.response_ids)

    def mask(self) -> list[int]:
        """1 on each response token the policy sampled, 0 on the environment's."""
        return self.policy_mask or [1] * len(self.response_ids)


@dataclass
class RolloutBatch:
    """Rollouts padded into tensors: prompts left-padded to P, responses right-padded to T."""

    input_ids: torch.Tensor  # (B, P + T) prompt then response token ids
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1.0 on response tokens the policy sampled, 0.0 on padding (and on an
    # environment's messages inside a conversation)
    response_ids: torch.Tensor  # (B, T) response token ids (pad where masked)
    behaviour_logprobs: torch.Tensor  # (B, T) log-probs of the sampled tokens under the policy that sampled them
    ref_logprobs: torch.Tensor  # (B, T) reference model's log-probs of the same tokens
    scores: torch.Tensor  # (B,) reward of each response
    finished: torch.Tensor  # (B,) bool: the response ended with EOS, not at the length limit
    versions: torch.Tensor  # (B,) policy version that produced each row
    groups: torch.Tensor  # (B,) the prompt draw each row answers: the rows of one draw are one group

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(**{name: getattr(self, name)[rows] for name in self.__dataclass_fields__})


def pad(prompt_ids: list[list[int]], response_ids: list[list[int]],
        pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, P+T), attention_mask (B, P+T), response_ids (B, T), response_mask (B, T)):
    prompts left-padded to P so that every row's response starts at the same column P."""
    P = max(len(p) for p in prompt_ids)
    T = max(len(r) for r in response_ids)
    input_ids = torch.full((len(prompt_ids), P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(prompt_ids), T))
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = 1.0
    return input_ids, attention_mask, input_ids[:, P:].clone(), response_mask


def _pad_floats(rows: list[list[float]], T: int) -> torch.Tensor:
    out = torch.zeros((len(rows), T))
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def collate(rollouts: list[Rollout], pad_id: int, with_reference: bool = True) -> RolloutBatch:
    """Pad scored rollouts into one batch; every rollout must carry a score, and reference log-probs unless
    `with_reference` is false (a learner that holds the reference computes them; the batch has zeros)."""
    missing = [r.prompt_index for r in rollouts if r.score is None or (with_reference and r.ref_logprobs is None)]
    if missing:
        raise ValueError(f"rollouts for prompts {missing[:5]} lack a score or reference log-probs")
    input_ids, attention_mask, response_ids, response_mask = pad(
        [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id)
    T = response_ids.shape[1]
    if any(r.policy_mask is not None for r in rollouts):  # conversations: the environment's tokens are not trained
        response_mask = _pad_floats([r.mask() for r in rollouts], T)
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
        response_ids=response_ids, behaviour_logprobs=_pad_floats([r.logprobs for r in rollouts], T),
        ref_logprobs=_pad_floats([r.ref_logprobs or [] for r in rollouts], T),
        scores=torch.tensor([r.score for r in rollouts], dtype=torch.float32),
        finished=torch.tensor([r.finished for r in rollouts], dtype=torch.bool),
        versions=torch.tensor([r.version for r in rollouts]),
        # rollouts made outside the stream (tests, tools) carry no draw number: their prompt is their group
        groups=torch.tensor([r.draw if r.draw >= 0 else r.prompt_index for r in rollouts]))
