"""Benchmark (prints figures; not a test). In one run, on the same model and batch:

1. generated tokens/s of one generation worker (Ray actor, rollouts returned to the driver) vs the
   same vLLM engine called directly inside that actor;
2. the time of a full weight sync (the learner publishes its weights once, in buckets; every worker loads
   them) and the extra memory it takes on the learner and on each worker, for several bucket sizes;
3. the learner's memory per rank (weights, gradients, optimizer state) for learner groups of 1 and 2 ranks;
4. the stage bound: each stage of a training step measured alone at the job's batch (generation by the
   bare engine, scoring, the reference forward, the learner's update), and their sum;
5. the per-stage time of a training step in synchronous (max_staleness=0) and overlapped
   (max_staleness=1) mode, with the job's peak memory, and the step time against the stage bound.

    .venv/bin/python bench/benchmark.py                      # SmolLM2-135M-Instruct, the default job's batch
    .venv/bin/python bench/benchmark.py --model embedded:tiny --prompts 16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from actors.generation import GenerationWorker
from cluster.commands import DEFAULT_CONFIG
from cluster.job import train
from cluster.launch import launch_learners, start_ray
from cluster.models import resolve_model
from core.config import load_config, replace_section
from core.prompts import load_prompts
from core.rollout import Rollout


class BenchWorker(GenerationWorker):
    async def direct(self, prompt_ids: list[list[int]], n: int) -> tuple[int, float]:
        """(generated tokens, seconds) of the engine's own requests, nothing around them."""
        import asyncio

        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=self.cfg.temperature, max_tokens=self.cfg.max_new_tokens, logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(j: int, ids: list[int]) -> int:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=f"direct-{j}"):
                pass
            return len(out.outputs[0].token_ids)

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(j, p) for j, p in enumerate(p for p in prompt_ids for _ in range(n))))
        return sum(tokens), time.perf_counter() - start


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


def private_memory(pid: int) -> int:
    """Bytes of a process's own (anonymous) resident memory: its heap and tensors, not the object store's
    shared pages that it maps to write or read an object."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


class PeakMemory:
    """The highest private memory of some processes above their level at the start, sampled every 5 ms."""

    def __init__(self, pids: dict[str, int]):
        self.procs = pids
        self.base = {name: private_memory(pid) for name, pid in pids.items()}
        self.peak = dict(self.base)
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            for name, pid in self.procs.items():
                self.peak[name] = max(self.peak[name], private_memory(pid))
            time.sleep(0.005)

    def stop(self) -> dict[str, float]:
        """MiB above the start, per process."""
        self.running = False
        self.thread.join()
        return {name: (self.peak[name] - self.base[name]) / 2**20 for name in self.procs}


def bench_weight_sync(cfg, model_path, workers: int, repeats: int, bucket_sizes: list[float]) -> None:
    """Full sync time and peak extra memory on the learner and each worker, for each bucket size (one
    bucket of the whole model is the old single-object publication)."""
    actors = [ray.remote(GenerationWorker).options(num_cpus=cfg.generation.num_cpus).remote(
        f"sync-{i}", model_path, cfg.generation) for i in range(workers)]
    pids = {}
    for i, s in enumerate(ray.get([a.stats.remote() for a in actors])):
        pids[f"worker {i}"] = s["pid"]
        pids[f"engine {i}"] = psutil.Process(s["pid"]).children()[0].pid  # where the model lives
    print(f"weight sync to {workers} workers ({cfg.generation.dtype}), median of {repeats} "
          f"(extra memory: a process's private memory above its level before the sync, highest of the syncs; "
          f"the published version itself lives in the object store's shared memory until the next one):")
    version = 0
    for bucket_mb in bucket_sizes:
        group = launch_learners(replace_section(cfg, "ppo", publish_bucket_mb=bucket_mb), model_path)
        pids["learner"] = group.pids()[0]
        publish, total, extra = [], [], {}
        for _ in range(repeats):
            version += 1
            peak = PeakMemory(pids)
            start = time.perf_counter()
            weights = group.publish()
            published = ray.get(weights)
            publish.append(time.perf_counter() - start)
            ray.get([a.load_weights.remote(version, weights) for a in actors])
            total.append(time.perf_counter() - start)
            extra = {k: max(v, extra.get(k, 0.0)) for k, v in peak.stop().items()}
            del weights
        label = "one bucket (whole model)" if len(published.buckets) == 1 else f"{bucket_mb:g} MiB buckets"
        print(f"  {label:26s} ({len(published.buckets):3d} of {published.nbytes / 2**20:.0f} MiB): publish "
              f"{statistics.median(publish):.2f} s, publish + all loaded {statistics.median(total):.2f} s; extra "
              f"memory: learner {extra['learner']:.0f} MiB, workers "
              + ", ".join(f"{extra[f'worker {i}']:.0f} + engine {extra[f'engine {i}']:.0f}" for i in range(workers))
              + " MiB")
        group.kill()
    for actor in actors:
        ray.kill(actor)


def bench_learner_memory(cfg, model_path, prompts, ranks: list[int]) -> None:
    """Bytes of weights, gradients and AdamW moments per learner rank after one update, for each group size."""
    from transformers import AutoConfig

    rng = random.Random(0)
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    batch = [Rollout(prompt_index=p.index, prompt_ids=p.token_ids, response_ids=[rng.randrange(vocab) for _ in range(8)],
                     text="", logprobs=[-1.0] * 8, version=0, worker="bench", finished=True, score=float(i % 2),
                     ref_logprobs=[-1.0] * 8) for i, p in enumerate(prompts[:8])]
    print(f"learner memory per rank after one update ({cfg.ppo.dtype} weights, AdamW):")
    for n in ranks:
        group = launch_learners(replace_section(cfg, "ppo", num_learners=n), model_path)
        ray.get(group.update(batch))
        memory = ray.get(group.ranks[0].memory.remote())  # every rank holds an equal share
        mib = {k: v / 2**20 for k, v in memory.items()}
        print(f"  {n} rank{'s' if n > 1 else ' '}: weights {mib['weights']:.0f} MiB + gradients {mib['gradients']:.0f} "
              f"MiB + optimizer {mib['optimizer']:.0f} MiB = {sum(mib.values()):.0f} MiB per rank")
        group.kill()


def bench_bound(cfg, model_path, prompts, repeats: int) -> float:
    """Each stage of one training step measured alone at the job's batch, one after another with the
    machine to itself: generation by the bare vLLM engine, scoring, the reference forward and the learner's
    update (its forward and backward passes). Their sum is the machine's bound on a step; returns it."""
    from actors.reference import ReferenceModel
    from reward_server.scorers import make_scorer

    gen, n = cfg.generation, cfg.generation.samples_per_prompt
    ids = [p.token_ids for p in prompts]
    worker = ray.remote(BenchWorker).options(num_cpus=gen.num_cpus).remote("bound-worker", model_path, gen)
    ray.get(worker.direct.remote(ids[:4], 1))  # warm-up
    stages = {"generate (bare engine)": [ray.get(worker.direct.remote(ids, n))[1] for _ in range(repeats)]}
    rollouts = ray.get(worker.generate.remote([(p.index, p.token_ids) for p in prompts], n))
    ray.kill(worker)
    texts = {p.index: p.text for p in prompts}
    scorer = make_scorer(cfg.reward.scorer)
    start = time.perf_counter()
    scores = scorer.score([texts[r.prompt_index] for r in rollouts], [r.text for r in rollouts])
    stages["score"] = [time.perf_counter() - start]
    for r, score in zip(rollouts, scores):
        r.score = float(score)
    if not cfg.reference_in_learner:  # else the learner's update includes the reference forward
        reference = ray.remote(ReferenceModel).options(num_cpus=cfg.reference.num_cpus).remote(
            model_path, cfg.reference, dtype=cfg.ppo.dtype, autocast=cfg.ppo.autocast, temperature=gen.temperature)
        args = ([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
        ray.get(reference.ref_logprobs.remote(*(a[:2] for a in args)))  # warm-up
        stages["reference forward"] = []
        for _ in range(repeats):
            start = time.perf_counter()
            ref_logprobs = ray.get(reference.ref_logprobs.remote(*args))
            stages["reference forward"].append(time.perf_counter() - start)
        ray.kill(reference)
        for r, lp in zip(rollouts, ref_logprobs):
            r.ref_logprobs = lp
    group = launch_learners(cfg, model_path)
    ray.get(group.update(rollouts))  # warm-up
    update = "learner update" + (" (with the reference forward)" if cfg.reference_in_learner else "")
    stages[update] = []
    for _ in range(repeats):
        start = time.perf_counter()
        ray.get(group.update(rollouts))
        stages[update].append(time.perf_counter() - start)
    group.kill()
    medians = {k: statistics.median(v) for k, v in stages.items()}
    tokens = sum(len(r.response_ids) for r in rollouts)
    print(f"stage bound: {len(rollouts)} completions ({tokens} tokens), each stage alone, median of {repeats}:")
    print("  " + " + ".join(f"{k} {v:.1f} s" for k, v in medians.items()) + f" = {sum(medians.values()):.1f} s")
    return sum(medians.values())


def run_job(cfg_path, overrides: list[str], steps: int) -> tuple[object, dict, list[dict]]:
    """(config, summary, metrics rows) of `steps` steps of the job, in a scratch directory, with no W&B run
    and no evaluation after the one at the start."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(cfg_path, [*overrides, f"train.steps={steps}", f"train.output_dir={out}",
                                     "train.wandb_mode=disabled", f"train.eval_every={steps * 10}"])
        summary = train(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, rows


def bench_steps(cfg_path, overrides, steps: int, bound: float | None = None, modes=(0, 1)) -> None:
    print(f"training step stages, mean of steps 2..{steps} (step 1 warms up):")
    for staleness in modes:
        _, summary, rows = run_job(cfg_path, [*overrides, f"train.max_staleness={staleness}"], steps)
        rows = [r for r in rows if r["step"] >= 2] or [r for r in rows if r["step"] >= 1]
        stages = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k.startswith("timing/")
                  and not k.endswith("_total")}
        mode = "synchronous (max_staleness=0)" if staleness == 0 else "overlapped (max_staleness=1)"
        print(f"  {mode}: " + ", ".join(f"{k.split('/')[1]} {v:.1f} s" for k, v in stages.items())
              + f"; {summary['samples_per_s']:.2f} samples/s, peak memory {summary['peak_memory_gib']:.1f} GiB")
        if bound:
            step = statistics.median(r["timing/step"] for r in rows)
            print(f"    median step {step:.1f} s against the stage bound {bound:.1f} s: {bound / step:.2f} of the bound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--model", default=None, help="model.path override, e.g. embedded:tiny")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per batch (default: the config's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="workers in the weight-sync figure")
    parser.add_argument("--steps", type=int, default=3, help="training steps per mode")
    parser.add_argument("--buckets", type=float, nargs="*", default=[1e6, 32, 8],
                        help="publication bucket sizes (MiB) in the weight-sync figure; 1e6 = the whole model")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2], help="learner group sizes to measure")
    parser.add_argument("--samples", type=int, default=None, help="generation.samples_per_prompt override")
    parser.add_argument("--staleness", type=int, nargs="*", default=[0, 1],
                        help="train.max_staleness of each measured job (ppo.old_logprobs=behaviour needs 0)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["generation", "sync", "learners", "bound", "steps"])
    parser.add_argument("overrides", nargs="*", help="run-config overrides, e.g. ppo.advantage=grpo")
    args = parser.parse_args()
    overrides = (([f"train.prompts_per_step={args.prompts}"] if args.prompts else [])
                 + ([f"model.path={args.model}"] if args.model else [])
                 + ([f"generation.samples_per_prompt={args.samples}"] if args.samples else []) + args.overrides)
    cfg = load_config(args.config, overrides)
    args.prompts = cfg.train.prompts_per_step
    model_path = resolve_model(cfg.model.path)
    from transformers import AutoTokenizer

    train_prompts, _ = load_prompts(cfg.data, AutoTokenizer.from_pretrained(model_path))
    start_ray(cfg.train)
    print(f"model {cfg.model.path}, batch {args.prompts} prompts, generation dtype {cfg.generation.dtype}")
    if "generation" not in args.skip:
        bench_generation(cfg, model_path, train_prompts[:args.prompts], args.repeats)
    if "sync" not in args.skip:
        bench_weight_sync(cfg, model_path, args.workers, args.repeats, args.buckets)
    if "learners" not in args.skip:
        bench_learner_memory(cfg, model_path, train_prompts, args.ranks)
    bound = None
    if "bound" not in args.skip:
        bound = bench_bound(cfg, model_path, train_prompts[:args.prompts], args.repeats)
    if "steps" not in args.skip:
        bench_steps(args.config, overrides, args.steps, bound, args.staleness)


if __name__ == "__main__":
    main()
