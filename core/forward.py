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

from core.rollout import pad

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (`float32`, `bfloat16`, `float16`)."""
    return DTYPES[name]


def autocast(device: str | torch.device, dtype: str):
    """Autocast to `dtype` on `device`, or nothing when `dtype` is `none` (compute in the weights' dtype)."""
    if dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch_dtype(dtype))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] for each position: logits (..., V), labels (...) -> (...).

    log_softmax subtracts the row max before anything is rounded; the cheaper
    logit[label] - logsumexp(logits) subtracts two large, separately rounded numbers and loses
    digits (badly so in bf16). Labels must be valid token ids everywhere, padding included (use the
    pad id there, not -100). Computed in the dtype of `logits`; memory is one (..., V) tensor.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def response_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits (B, T, V) of the response positions of a left-padded batch, divided by the sampling
    temperature (so that log-probs match what the generation workers sampled from), and the trunk's
    hidden states (B, T, H) they came from (the value head reads those).

    One decoder call whatever the rows hold: in a learner group every decoder layer is an FSDP2 unit, so
    the number of calls is a collective that no rank's data may decide. The LM head runs on the response
    positions only: the prompt's logits are never needed, and at a 49k vocabulary they would be most of
    the memory. It runs outside autocast, in float32.
    """
    decoder = model.get_decoder()
    prompt_len = input_ids.shape[1] - response_len
    firsts, rows = shared_prompts(input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
    if firsts is None or decoder.config._attn_implementation not in PACKABLE:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        hidden = hidden[:, -response_len - 1:-1]  # position P-1+t predicts response token t
    else:
        hidden = _packed_hidden(decoder, input_ids, attention_mask, prompt_len, firsts, rows)
    head = model.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        logits = after_head(model.config, torch.nn.functional.linear(hidden.float(), head.weight.float(), bias))
    return logits / temperature, hidden


def after_head(config, logits: torch.Tensor) -> torch.Tensor:
    """The transforms some architectures apply to the LM head's output in their own forward (and vLLM with
    them): Cohere's `logit_scale`, Granite's `logits_scaling`, Gemma 2/3's final soft-capping. Any other is
    caught by `load_causal_lm`'s check."""
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def load_causal_lm(path: str, dtype: str, device: str | torch.device):
    """An HF causal LM in `dtype` on `device`, refused by name where its own forward computes logits that
    `response_forward` does not (a transform after the LM head that `after_head` does not know): log-probs
    of such a model here would not be the ones its generation samples from."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device)
    ids = torch.arange(3, 11, device=model.device).unsqueeze(0)
    with torch.no_grad():
        ours, _ = response_forward(model, ids, torch.ones_like(ids), 4)
        theirs = model(input_ids=ids).logits[:, -5:-1].float()
    gap = (ours - theirs).abs().max().item()
    # bf16 weights round the model's own head (ours runs in float32): allow a few per cent of the logits' size
    if gap > 0.05 * max(theirs.abs().max().item(), 1.0):
        raise ValueError(f"{type(model).__name__} ({path}) computes its logits in a way this project's forward "
                         f"does not reproduce (largest logit gap {gap:.3g}): a transform after its LM head that "
                         f"core/forward.py's after_head does not apply. Such models are not supported yet")
    return model


# Attention implementations that take a custom 4D mask (flash attention does not: it sees no sharing).
PACKABLE = ("sdpa", "eager")


def _packed_hidden(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   firsts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, T, H) that predict each row's response tokens, with each distinct prompt run once.

    The rows that answer one prompt (a group of samples) are packed into one sequence: the prompt, then each
    row's response in a block of its own, T columns each. A 4D attention mask lets a block see the prompt
    and itself, causally, and never another block; each block's positions continue from the prompt's. So
    every response attends to exactly the keys it would in a row of its own (the same arithmetic as the
    plain forward, to float rounding), and the gradient reaching the shared prompt is the sum over its rows,
    all in one call of the decoder. (A prompt pass into a key/value cache and a second call for the replies
    does the same work but calls every layer twice before one backward, which FSDP2 does not survive.)
    """
    B, T, P, G = len(rows), input_ids.shape[1] - prompt_len, prompt_len, len(firsts)
    device = input_ids.device
    # each row's slot among its group's rows (0 for the first, 1 for the next...)
    order = torch.argsort(rows, stable=True)
    starts = torch.searchsorted(rows[order], rows[order], side="left")
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(B, device=device) - starts
    K = int(slot.max()) + 1
    columns = P + slot.unsqueeze(1) * T + torch.arange(T, device=device)  # (B, T): each response token's column

    L = P + K * T
    ids = torch.zeros((G, L), dtype=input_ids.dtype, device=device)
    real = torch.zeros((G, L), dtype=torch.bool, device=device)
    segment = torch.full((G, L), -1, dtype=torch.long, device=device)  # -1: the prompt; j: response block j
    positions = torch.zeros((G, L), dtype=torch.long, device=device)
    prompt_mask = attention_mask[firsts, :P]
    ids[:, :P], real[:, :P] = input_ids[firsts, :P], prompt_mask.bool()
    positions[:, :P] = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    segment[:, P:] = (torch.arange(K * T, device=device) // T).expand(G, -1)
    row_of = rows.unsqueeze(1).expand(-1, T)
    ids[row_of, columns] = input_ids[:, P:]
    real[row_of, columns] = attention_mask[:, P:].bool()
    positions[row_of, columns] = prompt_mask.sum(-1)[rows].unsqueeze(1) + torch.arange(T, device=device)

    q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # (G, L, 1), (G, 1, L)
    causal = torch.ones((L, L), dtype=torch.bool, device=device).tril()
    visible = causal & real.unsqueeze(1) & ((k == -1) | (k == q))
    # A padding query sees itself, so that no softmax row is empty (its output is never read)
    visible |= torch.eye(L, dtype=torch.bool, device=device)
    if decoder.config._attn_implementation == "eager":  # eager attention adds the mask to its scores
        visible = torch.zeros(visible.shape, device=device).masked_fill(~visible, torch.finfo(torch.float32).min)
    hidden = decoder(input_ids=ids, attention_mask=visible.unsqueeze(1), position_ids=positions).last_hidden_state
    # token t of a response is predicted at its column - 1, token 0 by the prompt's last position
    predictors = torch.cat([torch.full((B, 1), P - 1, device=device), columns[:, :-1]], dim=1)
    return hidden[row_of, predictors]


def shared_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """(the first row of each distinct prompt, each row's index into those) when some rows of a left-padded
    batch share a prompt, else (None, None)."""
    distinct, rows = torch.unique(torch.cat([prompt_ids, prompt_mask.long()], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(rows):
        return None, None
    firsts = torch.full((len(distinct),), len(rows), dtype=torch.long, device=rows.device)
    return firsts.scatter_reduce(0, rows, torch.arange(len(rows), device=rows.device), "amin"), rows


def padded_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor, *,
                    temperature: float = 1.0, autocast_dtype: str = "none", forward=response_forward
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(log-prob (B, T) of each response token in float32, what `forward` returns beside the logits (the value
    head's values, or the trunk's hidden states), the logits (B, T, V)) of a left-padded batch whose last T
    positions are `response_ids` (B, T). `forward(model, input_ids, attention_mask, response_len, temperature)`
    runs the model (default: `response_forward` on an HF causal LM). The one forward of every log-prob: the
    learner's update, the reference's, SFT's and DPO's."""
    device = next(model.parameters()).device
    with autocast(device, autocast_dtype):
        logits, extra = forward(model, input_ids.to(device), attention_mask.to(device), response_ids.shape[1],
                                temperature)
    return logprobs_from_logits(logits, response_ids.to(device)), extra, logits


def reply_logprobs(model, examples: list[tuple[list[int], list[int]]], pad_id: int, autocast_dtype: str = "none",
                   temperature: float = 1.0, forward=response_forward) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each reply token (B, T), mask (B, T)) of (prompt ids, reply ids) rows under `model`."""
    input_ids, attention_mask, reply_ids, mask = pad([p for p, _ in examples], [r for _, r in examples], pad_id)
    logprobs, _, _ = padded_logprobs(model, input_ids, attention_mask, reply_ids, temperature=temperature,
                                     autocast_dtype=autocast_dtype, forward=forward)
    return logprobs, mask.to(logprobs.device)


@torch.no_grad()
def token_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int,
                   temperature: float = 1.0, autocast_dtype: str = "none",
                   micro_batch: int = 16, forward=response_forward) -> list[list[float]]:
    """log pi(token) of every response token under `model`, one list per row (no gradient), `micro_batch`
    rows a forward (`reply_logprobs`)."""
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), micro_batch):
        responses = response_ids[start:start + micro_batch]
        logprobs, _ = reply_logprobs(model, list(zip(prompt_ids[start:start + micro_batch], responses)), pad_id,
                                     autocast_dtype, temperature, forward)
        logprobs = logprobs.cpu()
        out += [logprobs[i, :len(r)].tolist() for i, r in enumerate(responses)]
    return out
