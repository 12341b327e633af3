"""The one model-forward path for per-token log-probs, shared by the learner and the reference model:
pad (prompt, response) rows -> decoder -> LM head on the response positions in float32 -> log-softmax.
Also the dtype helpers every role uses (the reward model's trainer included).

Both sides of a log-prob comparison must compute it the same way: the KL penalty subtracts the
reference's log-probs from the learner's, and the PPO ratio subtracts two of the learner's. The LM head
and the log-softmax therefore run in float32 whatever the trunk's dtype: over a 49k vocabulary a bf16
logit keeps about 3 significant digits, and the log-prob of a likely token is a small difference of
two large numbers.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from actors.rollout import pad
from learner.ppo_math import logprobs_from_logits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (`float32`, `bfloat16`, `float16`)."""
    return DTYPES[name]


def autocast(device: str | torch.device, dtype: str):
    """Autocast to `dtype` on `device`, or nothing when `dtype` is `none` (compute in the weights' dtype)."""
    if dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch_dtype(dtype))


def response_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits (B, T, V) of the response positions of a left-padded batch, divided by the sampling
    temperature (so that log-probs match what the generation workers sampled from), and the trunk's
    hidden states (B, T, H) they came from (the value head reads those).

    The LM head runs on the response positions only: the prompt's logits are never needed, and at a
    49k vocabulary they would be most of the memory. It runs outside autocast, in float32.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    prefix = input_ids.shape[1] - response_len - 1  # the prompt but its last token, which predicts the first reply's
    firsts, rows = shared_prompts(input_ids[:, :prefix], attention_mask[:, :prefix]) if prefix > 0 else (None, None)
    if firsts is None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    else:
        # Rows that answer the same prompt (a group of samples) share its forward: the prompt runs once into a
        # key/value cache, copied to each of its rows, and the rows run only their replies on top. Same
        # arithmetic as the full forward; the gradient of the shared prompt is the sum over its rows.
        cache = DynamicCache(config=decoder.config)
        decoder(input_ids=input_ids[firsts, :prefix], attention_mask=attention_mask[firsts, :prefix],
                position_ids=position_ids[firsts, :prefix], past_key_values=cache, use_cache=True)
        cache.batch_select_indices(rows)
        hidden = decoder(input_ids=input_ids[:, prefix:], attention_mask=attention_mask,
                         position_ids=position_ids[:, prefix:], past_key_values=cache, use_cache=True).last_hidden_state
    hidden = hidden[:, -response_len - 1:-1]  # position P-1+t predicts response token t
    head = model.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        logits = torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)
    return logits / temperature, hidden


def shared_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """(the first row of each distinct prompt, each row's index into those) when some rows of a left-padded
    batch share a prompt, else (None, None)."""
    distinct, rows = torch.unique(torch.cat([prompt_ids, prompt_mask.long()], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(rows):
        return None, None
    firsts = torch.full((len(distinct),), len(rows), dtype=torch.long, device=rows.device)
    return firsts.scatter_reduce(0, rows, torch.arange(len(rows), device=rows.device), "amin"), rows


@torch.no_grad()
def token_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int,
                   temperature: float = 1.0, autocast_dtype: str = "none",
                   micro_batch: int = 16, forward=None) -> list[list[float]]:
    """log pi(token) of every response token under `model`, one list per row (no gradient). `forward(model,
    input_ids, attention_mask, response_len, temperature)` -> (logits, _) runs the model (default:
    response_forward)."""
    forward = forward or response_forward
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), micro_batch):
        prompts, responses = prompt_ids[start:start + micro_batch], response_ids[start:start + micro_batch]
        input_ids, attention_mask, labels, _ = pad(prompts, responses, pad_id)
        with autocast(device, autocast_dtype):
            logits, _ = forward(model, input_ids.to(device), attention_mask.to(device), labels.shape[1], temperature)
        lp = logprobs_from_logits(logits, labels.to(device)).cpu()
        out += [lp[i, :len(r)].tolist() for i, r in enumerate(responses)]
    return out
