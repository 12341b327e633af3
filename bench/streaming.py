"""Streamed against chunked generation when replies differ in length (prints figures; not a test).

One generation worker, the same prompts in the same order, the same number of prompts in flight
(`generation.prompts_per_request`), two ways of handing them over, run one after the other, `--repeats`
times alternately:
- chunked: one call of `prompts_per_request` prompts at a time, which answers when its longest reply is done;
  while the stragglers finish, the engine runs a batch that shrinks and nothing new comes in;
- streamed (the rollout stream's default): one prompt a call, `prompts_per_request` calls in flight, a new
  one sent as soon as one answers, so the engine's batch stays full.
Half the prompts ask for a detailed answer, half for one sentence, so replies run from a few tokens to
`--max-new-tokens`.

    .venv/bin/python bench/streaming.py                                  # SmolLM2, replies of up to 256 tokens
    .venv/bin/python bench/streaming.py --model embedded:tiny --prompts 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray

from actors.generation import GenerationWorker
from cluster.commands import DEFAULT_CONFIG
from cluster.launch import start_ray
from cluster.models import resolve_model
from core.config import load_config
from core.prompts import builtin_setbacks, encode

LONG = "Explain in detail, in several paragraphs with examples, how to see the bright side of this: {}"
SHORT = "In one short sentence: {}"


def mixed_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` setbacks, asked alternately for a long and a short answer, as chat-formatted token ids."""
    setbacks = builtin_setbacks()[:count]
    rows = [(LONG if i % 2 == 0 else SHORT).format(text) for i, text in enumerate(setbacks)]
    return [p.token_ids for p in encode(rows, tokenizer, max_tokens=128)]


def chunked(worker, prompts: list[list[int]], per_call: int, n: int) -> tuple[int, int, float]:
    """(completions, tokens, seconds): calls of `per_call` prompts, one at a time."""
    start, completions, tokens = time.perf_counter(), 0, 0
    for at in range(0, len(prompts), per_call):
        rollouts = ray.get(worker.generate.remote(list(enumerate(prompts[at:at + per_call], at)), n))
        completions += len(rollouts)
        tokens += sum(len(r.response_ids) for r in rollouts)
    return completions, tokens, time.perf_counter() - start


def streamed(worker, prompts: list[list[int]], in_flight: int, n: int) -> tuple[int, int, float]:
    """(completions, tokens, seconds): one prompt a call, `in_flight` calls at once, refilled as they answer."""
    start, completions, tokens = time.perf_counter(), 0, 0
    todo, running = list(enumerate(prompts)), []
    while todo or running:
        while todo and len(running) < in_flight:
            running.append(worker.generate.remote([todo.pop(0)], n))
        done, running = ray.wait(running, num_returns=1)
        rollouts = ray.get(done[0])
        completions += len(rollouts)
        tokens += sum(len(r.response_ids) for r in rollouts)
    return completions, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--model", default=None, help="model.path override, e.g. embedded:tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="run-config overrides, e.g. generation.prompts_per_request=8")
    args = parser.parse_args()
    overrides = ([f"model.path={args.model}"] if args.model else []) + [
        f"generation.max_new_tokens={args.max_new_tokens}", "data.max_prompt_tokens=128",
        f"generation.max_model_len={128 + args.max_new_tokens}"] + args.overrides
    cfg = load_config(args.config, overrides)
    gen = cfg.generation
    model_path = resolve_model(cfg.model.path)
    from transformers import AutoTokenizer

    prompts = mixed_prompts(AutoTokenizer.from_pretrained(model_path), args.prompts)
    start_ray(cfg.train)
    worker = ray.remote(GenerationWorker).options(num_cpus=gen.num_cpus).remote("bench-streaming", model_path, gen)
    ray.get(worker.generate.remote([(0, prompts[1])], 1))  # warm-up
    runs = {"chunked": [], "streamed": []}
    for _ in range(args.repeats):  # alternately, so drift on a shared machine hits both alike
        runs["chunked"].append(chunked(worker, prompts, gen.prompts_per_request, gen.samples_per_prompt))
        runs["streamed"].append(streamed(worker, prompts, gen.prompts_per_request, gen.samples_per_prompt))
    print(f"model {cfg.model.path}, {len(prompts)} prompts x {gen.samples_per_prompt} samples, replies of up to "
          f"{gen.max_new_tokens} tokens, {gen.prompts_per_request} prompts in flight, generation dtype {gen.dtype}, "
          f"median of {args.repeats}:")
    seconds = {}
    for mode, results in runs.items():
        seconds[mode] = statistics.median(s for _, _, s in results)
        rate = statistics.median(c / s for c, _, s in results)
        tokens = statistics.median(t / s for _, t, s in results)
        print(f"  {mode:9s} {seconds[mode]:7.1f} s   {rate:6.2f} completions/s   {tokens:6.0f} tokens/s")
    print(f"  chunked takes {seconds['chunked'] / seconds['streamed']:.2f}x the streamed time: "
          f"{seconds['chunked'] - seconds['streamed']:.1f} s lost to stragglers")
    ray.kill(worker)


if __name__ == "__main__":
    main()
