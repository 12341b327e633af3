"""Supervised fine-tuning on demonstrations (`rlhf sft`): the first stage of the RLHF recipe.

Demonstrations (core/demonstrations.py) become the policy's own token layout:
the prompt with the chat template and its generation prompt, as the generation workers see it, then the
reply's tokens and EOS, as they would sample it. The loss is the mean negative log-likelihood of the reply
tokens only: the prompt is context, not a target. The result is an HF directory that `model.path` takes.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING

import torch

from core.demonstrations import Demonstration, DemonstrationError, load_demonstrations, raise_or_skip
from core.forward import load_causal_lm, reply_logprobs, response_forward
from core.preferences import split_pairs
from core.rollout_records import best_share, load_scored
from learner.lora import add_adapters
from learner.ppo_math import masked_mean
from learner.trainer import Trainer, seed_and_threads, through

if TYPE_CHECKING:
    from core.config import SFTConfig

log = logging.getLogger(__name__)


def encode_reply(tokenizer, prompt: str | list[dict], reply: str, finished: bool = True
                 ) -> tuple[list[int], list[int]]:
    """(prompt ids with the chat template and generation prompt, reply ids + EOS): the token layout of a
    prompt and a reply as the generation workers see and sample them. A reply that was cut off at the length
    limit (`finished` false) gets no EOS: it did not end there."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids), tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * finished


def encode(demos: list[Demonstration], tokenizer, max_length: int, source: str,
           on_bad_row: str = "error", stage: str = "sft") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) of every demonstration (`encoded_rows`)."""
    return [(prompt, reply) for _, prompt, reply in encoded_rows(demos, tokenizer, max_length, source, on_bad_row,
                                                                 stage)]


def encoded_rows(rows: list, tokenizer, max_length: int, source: str, on_bad_row: str, stage: str,
                 error: type[Exception] = DemonstrationError) -> list[tuple]:
    """(row, prompt ids, reply ids) of demonstrations or scored replies in the policy's layout: a row's tokens as
    sampled where it holds them (`response_ids`), else its text by `encode_reply`. One over `max_length` tokens
    is a bad row, named with `stage`'s max_length and on_bad_row fields (raised as `error`)."""
    encoded, problems = [], []
    for row in rows:
        if getattr(row, "response_ids", None) is not None:
            prompt, reply = list(row.prompt_ids), list(row.response_ids)
        else:
            prompt, reply = encode_reply(tokenizer, row.prompt, row.response, row.finished)
        if len(prompt) + len(reply) > max_length:
            problems.append(f"row {row.row}: {len(prompt)} prompt + {len(reply)} reply tokens, over "
                            f"{stage}.max_length = {max_length}")
            continue
        encoded.append((row, prompt, reply))
    raise_or_skip(source, problems, len(rows), on_bad_row, f"{stage}.on_bad_row", error)
    return encoded


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the reply tokens of a batch (B, T): every reply token weighs the
    same; padding (mask 0) counts for nothing, whatever it holds."""
    return -masked_mean(logprobs, mask)


def reply_nll(model, examples: list[tuple[list[int], list[int]]], pad_id: int, autocast_dtype: str,
              forward=response_forward) -> tuple[torch.Tensor, int]:
    """(mean NLL of the reply tokens, their number) of encoded demonstrations under `model` (`reply_logprobs`)."""
    logprobs, mask = reply_logprobs(model, examples, pad_id, autocast_dtype, forward=forward)
    return sft_loss(logprobs, mask), int(mask.sum().item())


@torch.no_grad()
def held_out_nll(model, examples: list[tuple[list[int], list[int]]], pad_id: int, autocast_dtype: str,
                 batch_size: int = 16, forward=response_forward) -> dict[str, float]:
    """NLL per reply token over all of `examples` (token-weighted across batches) and its perplexity."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss, n = reply_nll(model, examples[start:start + batch_size], pad_id, autocast_dtype, forward)
        total, tokens = total + loss.item() * n, tokens + n
    nll = total / max(tokens, 1)
    return {"eval/loss": nll, "eval/perplexity": math.exp(nll)}


def load_policy(model_path: str, cfg, section: str):
    """(causal LM, tokenizer) of the policy at `model_path` in `cfg.dtype` on `cfg.device`, seeded first; with
    `cfg.lora_rank` > 0 the LM carries LoRA adapters (the config `section`'s), the base frozen."""
    from transformers import AutoTokenizer

    seed_and_threads(cfg)
    model = load_causal_lm(model_path, cfg.dtype, torch.device(cfg.device))
    if cfg.lora_rank:
        model = add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, section)
    return model, AutoTokenizer.from_pretrained(model_path)


class SFTTrainer(Trainer):
    name = "sft"

    def __init__(self, model_path: str, cfg: SFTConfig):
        super().__init__(cfg, *load_policy(model_path, cfg, self.name))
        self.pad_id = self.model.config.pad_token_id or 0

    def nll(self, examples: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, int]:
        """(mean NLL of the reply tokens, their number) of a batch of encoded demonstrations."""
        return reply_nll(self.lm, examples, self.pad_id, self.cfg.autocast, forward=through)

    def size(self, example) -> int:
        return len(example[1])  # the loss is a mean over reply tokens

    def loss(self, batch: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.nll(batch)[0], {}

    def evaluate(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, float]:
        """Held-out NLL per reply token and its perplexity."""
        self.model.eval()
        return held_out_nll(self.lm, examples, self.pad_id, self.cfg.autocast, self.cfg.batch_size, forward=through)


def split(demos: list[Demonstration], cfg: SFTConfig) -> tuple[list[Demonstration], list[Demonstration]]:
    """(train, held-out): `sft.eval_path`'s demonstrations, else `sft.eval_fraction` of `sft.path`'s."""
    if cfg.eval_path:
        return demos, _load_logged(cfg.eval_path, cfg)
    return split_pairs(demos, cfg.eval_fraction, cfg.seed, "sft.eval_fraction")


def _load_logged(path: str, cfg: SFTConfig) -> list[Demonstration]:
    if cfg.best_fraction < 1:  # filtered SFT: each prompt's best scored replies
        replies, skipped = load_scored(path, (cfg.prompt_column, cfg.response_column, cfg.reward_column), None,
                                       cfg.on_bad_row, "sft.on_bad_row")
        best = best_share(replies, cfg.best_fraction)
        log.info("%s: the best %d of %d scored replies (sft.best_fraction = %g)", path, len(best), len(replies),
                 cfg.best_fraction)
        demos = [Demonstration(r.prompt, r.response, r.row, r.finished) for r in best]
    else:
        demos, skipped = load_demonstrations(path, cfg)
    if skipped:
        log.warning("%s: skipped %d bad rows (sft.on_bad_row=skip), e.g. %s", path, len(skipped), "; ".join(skipped[:3]))
    return demos


def encoded_demonstrations(path: str, cfg: SFTConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The demonstrations of `path` (read as `sft.*` says), as (prompt ids, reply ids) in the policy's layout."""
    return encode(_load_logged(path, cfg), tokenizer, cfg.max_length, path, cfg.on_bad_row)


def run_sft(model_path: str, cfg: SFTConfig, logger=None) -> tuple[str, list[dict]]:
    """`rlhf sft`: fine-tune the policy at `model_path` on `sft.path` (on `sft.num_learners` ranks, Ray up for
    more than one), save it to `sft.output_dir` (`logger`: a RunLogger for the training figures)."""
    from transformers import AutoTokenizer

    from learner.trainer_group import train_stage

    if not cfg.path:
        raise DemonstrationError("sft.path is empty: give a demonstration file (prompt/response columns or a "
                                 "messages column), or make one with `rlhf make-demos`")
    train, held_out = split(_load_logged(cfg.path, cfg), cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_ids = encode(train, tokenizer, cfg.max_length, cfg.path, cfg.on_bad_row)
    held_out_ids = encode(held_out, tokenizer, cfg.max_length, cfg.eval_path or cfg.path, cfg.on_bad_row)
    log.info("sft: %d demonstrations, %d held out -> %s", len(train_ids), len(held_out_ids), cfg.output_dir)
    trainer, history = train_stage(partial(SFTTrainer, model_path, cfg), cfg, train_ids, held_out_ids, logger)
    return trainer.save(cfg.output_dir), history
