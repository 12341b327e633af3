"""Benchmark (prints figures; not a test). In one run, on the same model and batch:

1. generated tokens/s of one generation worker (Ray actor, rollouts returned to the driver) vs the
   same vLLM engine called directly inside that actor;
2. the time of a full weight sync: the learner publishes its weights once, every worker loads them;
3. the per-stage time of a training step in synchronous (max_staleness=0) and overlapped
   (max_staleness=1) mode, with the job's peak memory.

    .venv/bin/python bench/benchmark.py                      # SmolLM2-135M-Instruct, 64 prompts
    .venv/bin/python bench/benchmark.py --model embedded:tiny --prompts 16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from actors.generation import GenerationWorker
from actors.prompts import load_prompts
from cluster.cli import DEFAULT_CONFIG
from cluster.config import load_config
from cluster.launch import start_ray
from cluster.models import resolve_model
from learner.learner import PPOLearner
from cluster.job import train


class BenchWorker(GenerationWorker):
    def direct(self, prompt_ids: list[list[int]], n: int) -> tuple[int, float]:
        """(generated tokens, seconds) of the engine's own generate call, nothing around it."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, temperature=self.cfg.temperature, max_tokens=self.cfg.max_new_tokens,
                                logprobs=0)
        start = time.perf_counter()
        out = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return sum(len(s.token_ids) for o in out for s in o.outputs), seconds


def median_rate(runs: list[tuple[int, float]]) -> float:
    return statistics.median(tokens / seconds for tokens, seconds in runs)


def bench_generation(cfg, model_path, prompts, repeats: int) -> None:
    worker = ray.remote(BenchWorker).options(num_cpus=cfg.generation.num_cpus).remote(
        "bench-worker", model_path, cfg.generation)
    batch = [(p.index, p.token_ids) for p in prompts]
    ray.get(worker.direct.remote([p for _, p in batch[:4]], 1))  # warm-up
    via_actor, direct = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        start = time.perf_counter()
        rollouts = ray.get(worker.generate.remote(batch, 1))
        via_actor.append((sum(len(r.response_ids) for r in rollouts), time.perf_counter() - start))
        direct.append(ray.get(worker.direct.remote([p for _, p in batch], 1)))
    a, d = median_rate(via_actor), median_rate(direct)
    print(f"generation, {len(batch)} prompts x {cfg.generation.max_new_tokens} tokens, median of {repeats}:")
    print(f"  worker actor (rollouts to driver) {a:8.0f} tok/s")
    print(f"  vLLM engine called directly       {d:8.0f} tok/s   (worker/direct = {a / d:.2f})")
    ray.kill(worker)


def bench_weight_sync(cfg, model_path, workers: int, repeats: int) -> None:
    actors = [ray.remote(GenerationWorker).options(num_cpus=cfg.generation.num_cpus).remote(
        f"sync-{i}", model_path, cfg.generation) for i in range(workers)]
    learner = ray.remote(PPOLearner).options(num_cpus=cfg.ppo.num_cpus).remote(
        model_path, cfg.ppo, inference_dtype=cfg.generation.dtype)
    ray.get([a.stats.remote() for a in actors] + [learner.get_version.remote()])
    publish, total = [], []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        weights = learner.weights.remote()
        ray.wait([weights], fetch_local=False)
        published = time.perf_counter()
        ray.get([a.load_weights.remote(version, weights) for a in actors])
        publish.append(published - start)
        total.append(time.perf_counter() - start)
        del weights
    print(f"weight sync to {workers} workers ({cfg.generation.dtype}), median of {repeats}: "
          f"publish {statistics.median(publish):.2f} s, publish + all loaded {statistics.median(total):.2f} s")
    for actor in actors + [learner]:
        ray.kill(actor)


def bench_steps(cfg_path, overrides, steps: int) -> None:
    print(f"training step stages, mean of steps 2..{steps} (step 1 warms up):")
    for staleness in (0, 1):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(cfg_path, [*overrides, f"train.steps={steps}", f"train.max_staleness={staleness}",
                                         f"train.output_dir={out}", "train.wandb_mode=disabled",
                                         f"train.eval_every={steps * 10}"])
            summary = train(cfg)
            rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["step"] >= 2] or [r for r in rows if r["step"] >= 1]
        stages = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k.startswith("timing/")
                  and not k.endswith("_total")}
        mode = "synchronous (max_staleness=0)" if staleness == 0 else "overlapped (max_staleness=1)"
        print(f"  {mode}: " + ", ".join(f"{k.split('/')[1]} {v:.1f} s" for k, v in stages.items())
              + f"; {summary['samples_per_s']:.2f} samples/s, peak memory {summary['peak_memory_gib']:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--model", default=None, help="model.path override, e.g. embedded:tiny")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="workers in the weight-sync figure")
    parser.add_argument("--steps", type=int, default=3, help="training steps per mode")
    parser.add_argument("--skip", nargs="*", default=[], choices=["generation", "sync", "steps"])
    args = parser.parse_args()
    overrides = [f"train.prompts_per_step={args.prompts}"] + ([f"model.path={args.model}"] if args.model else [])
    cfg = load_config(args.config, overrides)
    model_path = resolve_model(cfg.model.path)
    from transformers import AutoTokenizer

    train_prompts, _ = load_prompts(cfg.data, AutoTokenizer.from_pretrained(model_path))
    start_ray(cfg.train)
    print(f"model {cfg.model.path}, batch {args.prompts} prompts, generation dtype {cfg.generation.dtype}")
    if "generation" not in args.skip:
        bench_generation(cfg, model_path, train_prompts[:args.prompts], args.repeats)
    if "sync" not in args.skip:
        bench_weight_sync(cfg, model_path, args.workers, args.repeats)
    if "steps" not in args.skip:
        bench_steps(args.config, overrides, args.steps)


if __name__ == "__main__":
    main()
