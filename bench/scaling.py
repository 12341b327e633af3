"""How the job's costs grow with nodes, on a simulated cluster (prints figures; not a test):

1. `publication`: the learner, on a node of its own, publishes its weights; generation workers on 1, 2 and 3
   other nodes (one each) load them, all at once as the job does, then one after another. Per version: the
   time until every worker has loaded it, and the bytes each node's object manager pushed to other nodes
   (Ray's `ray_object_manager_bytes` metric, scraped from every node), which shows whether the nodes fetch the
   version from the learner's node each time or from a node that already holds it.
2. `control-plane`: rollouts per second that the rollout stream sustains with stub engines that answer at
   once (each a Ray actor with a fraction of a CPU, returning ready-made rollouts of `--tokens` tokens), for
   1 to 32 workers, with the rewards answered in the driver or by the reward server (Serve, a scorer that
   costs nothing), and the driver process's CPU seconds per rollout. Each step takes a batch, ships it to the
   learner's side (`ray.put`, as the group does) and publishes a tiny new version, as the job does.

    .venv/bin/python bench/scaling.py publication                 # SmolLM2-135M-Instruct
    .venv/bin/python bench/scaling.py publication --model embedded:tiny --repeats 1
    .venv/bin/python bench/scaling.py control-plane --workers 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request

import ray

from cluster.commands import DEFAULT_CONFIG
from core.config import load_config, replace_section

PUSHED = "PushedFromLocalPlasma"


# --- 1. weight publication across nodes -----------------------------------------------------------------
def pushed_bytes() -> dict[str, float]:
    """Node id -> bytes its object manager has pushed to other nodes so far (from the node's metrics)."""
    pushed = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        pushed[node["NodeID"]] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                     if line.startswith("ray_object_manager_bytes") and f'Type="{PUSHED}"' in line)
    return pushed


def settled_pushed_bytes(before: dict[str, float], report_s: float) -> dict[str, float]:
    """Bytes pushed per node since `before`, once the metrics have caught up (two reports alike)."""
    last = None
    while True:
        time.sleep(report_s)
        now = {node: value - before.get(node, 0.0) for node, value in pushed_bytes().items()}
        if now == last:
            return now
        last = now


def bench_publication(cfg, model_path: str, node_counts: list[int], repeats: int) -> None:
    from actors.generation import GenerationWorker
    from cluster.launch import ACTOR_ENV, launch_learners
    from cluster.simulated import SimulatedCluster

    report_ms = 500
    most = max(node_counts)
    cluster = SimulatedCluster(head_cpus=1, object_store_mib=1024, system_config={"metrics_report_interval_ms": report_ms})
    cluster.add("learner", cfg.ppo.num_cpus, learner=1)
    for i in range(most):
        cluster.add(f"generation-{i}", cfg.generation.num_cpus, generation=1)
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False, runtime_env={"env_vars": ACTOR_ENV})
    try:
        cfg = replace_section(cfg, "train", role_resources=True)
        group = launch_learners(cfg, model_path)
        workers = [ray.remote(GenerationWorker).options(num_cpus=cfg.generation.num_cpus, resources={"generation": 1})
                   .remote(f"generation-{i}", model_path, cfg.generation) for i in range(most)]
        ray.get([w.stats.remote() for w in workers])
        names = {cluster.node_id(name): name for name in cluster.nodes}
        version = 0

        def one_version(count: int, together: bool) -> tuple[float, float, dict[str, float], int]:
            nonlocal version
            version += 1
            before = pushed_bytes()
            start = time.perf_counter()
            weights = group.publish()
            nbytes = ray.get(weights).nbytes
            published = time.perf_counter() - start
            if together:
                ray.get([w.load_weights.remote(version, weights) for w in workers[:count]])
            else:
                for w in workers[:count]:
                    ray.get(w.load_weights.remote(version, weights))
            loaded = time.perf_counter() - start
            sent = settled_pushed_bytes(before, 2 * report_ms / 1000)
            return published, loaded, {names.get(n, n[:8]): b for n, b in sent.items() if b}, nbytes

        print(f"weight publication of {cfg.model.path} ({cfg.generation.dtype}) from the learner's node to one "
              f"worker on each of N other nodes, median of {repeats} versions; 'pushed' is what each node's object "
              f"manager sent to other nodes, in copies of the version:")
        for together in (True, False):
            for count in node_counts if together else [most]:
                runs = [one_version(count, together) for _ in range(repeats)]
                nbytes = runs[0][3]
                pushed = {node: statistics.median(r[2].get(node, 0.0) for r in runs) / nbytes
                          for node in sorted({n for r in runs for n in r[2]})}
                how = "at once" if together else "one after another"
                total = statistics.median(sum(r[2].values()) for r in runs) / nbytes
                print(f"  N={count} ({how:17s}): version {nbytes / 2**20:.0f} MiB, published "
                      f"{statistics.median(r[0] for r in runs):.2f} s, all loaded "
                      f"{statistics.median(r[1] for r in runs):.2f} s; pushed {total:.2f} in all: "
                      + (", ".join(f"{node} {copies:.2f}" for node, copies in pushed.items()) or "nothing"))
        group.kill()
    finally:
        ray.shutdown()
        cluster.shutdown()


# --- 2. the driver's control plane ----------------------------------------------------------------------
class StubEngine:
    """A generation worker that answers at once: `tokens` tokens per response, made once."""

    def __init__(self, name: str, tokens: int):
        self.name, self.version, self.tokens = name, 0, tokens
        self.response = list(range(5, 5 + tokens))
        self.logprobs = [-1.0] * tokens

    def generate(self, prompts, n=1, temperature=None, max_tokens=None, expect_version=None):
        from core.rollout import Rollout

        return [Rollout(prompt_index=i, prompt_ids=list(ids), response_ids=self.response, text="a reply " * 16,
                        logprobs=self.logprobs, version=self.version, worker=self.name, finished=True)
                for i, ids in prompts for _ in range(n)]

    def load_weights(self, version, weights):
        for _ in weights.tensors():
            pass
        self.version = version
        return version

    def stats(self):
        return {"name": self.name, "version": self.version}


class DriverReward:
    """The reward client's interface, answered in the driver at no cost (the stream alone is measured)."""

    counters = {}

    def submit(self, prompts, responses):
        return [0.0] * len(responses)

    def done(self, pending):
        return True

    def result(self, pending):
        return pending


def stream_rate(cfg, workers: int, tokens: int, reward, seconds: float) -> tuple[float, float]:
    """(rollouts/s, driver CPU ms per rollout) of the stream fed by `workers` stub engines for `seconds`."""
    import torch

    from actors.prompt_ledger import PromptLedger
    from actors.rollout_stream import RolloutStream
    from actors.worker_pool import WorkerPool
    from core.prompts import Prompt
    from core.weights import publish_state_dict

    gen, train = cfg.generation, cfg.train

    def spawn(i):
        return ray.remote(StubEngine).options(num_cpus=1 / 32, max_task_retries=0).remote(f"stub-{i}", tokens)

    engines = [spawn(i) for i in range(workers)]
    ray.get([e.stats.remote() for e in engines])
    prompts = [Prompt(index=i, text=f"prompt {i}", token_ids=list(range(3, 3 + 64))) for i in range(4096)]
    stream = RolloutStream(WorkerPool(engines, spawn=spawn), PromptLedger(prompts), None, reward,
                           samples_per_prompt=gen.samples_per_prompt, prompts_per_request=gen.prompts_per_request,
                           buffer_size=train.buffer_size, max_staleness=max(1, train.max_staleness))
    batch = train.prompts_per_step * gen.samples_per_prompt

    def step():
        ray.put(stream.take(batch))  # what the learner group is sent
        with stream.training():
            pass
        weights = publish_state_dict({"w": torch.full((4,), float(stream.learner_version))}, bucket_bytes=64)
        stream.publish(ray.put(weights), block=False)

    for _ in range(3):  # warm up
        step()
    rollouts, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        step()
        rollouts += batch
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    stream.pool.shutdown()
    return rollouts / wall, 1000 * cpu / rollouts


def bench_control_plane(cfg, counts: list[int], tokens: int, seconds: float) -> None:
    from cluster.launch import start_ray
    from reward_server.client import RewardClient
    from reward_server.server import APP_NAME, start_reward_server

    start_ray(replace_section(cfg, "train", ray_num_cpus=max(4, int(cfg.train.ray_num_cpus))).train)
    served = replace_section(cfg, "reward", scorer="python:bench.scaling:free_scorer")
    handle = start_reward_server(served.reward)
    gen, train = cfg.generation, cfg.train
    print(f"control plane: stub engines answering at once ({tokens}-token responses, {gen.prompts_per_request} "
          f"prompts x {gen.samples_per_prompt} samples a call), {train.prompts_per_step * gen.samples_per_prompt} "
          f"rollouts a step, {seconds:g} s per figure; driver CPU = the driver process's CPU time (all its threads):")
    for workers in counts:
        rows = []
        for label, reward in (("rewards in the driver", DriverReward()),
                              ("reward server (Serve)", RewardClient(served.reward, APP_NAME, handle))):
            rate, cpu_ms = stream_rate(cfg, workers, tokens, reward, seconds)
            rows.append(f"{label}: {rate:6.0f} rollouts/s, driver {cpu_ms:.2f} ms CPU/rollout")
        print(f"  {workers:2d} workers: " + "; ".join(rows))


def free_scorer(prompts, responses) -> list[float]:
    """A scorer that costs nothing, so that the reward server's own path is what is measured."""
    return [0.0] * len(responses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["publication", "control-plane"])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--model", default=None, help="model.path override, e.g. embedded:tiny")
    parser.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 3], help="generation node counts")
    parser.add_argument("--repeats", type=int, default=3, help="versions published per figure")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32], help="stub engine counts")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stub response")
    parser.add_argument("--seconds", type=float, default=15, help="seconds per control-plane figure")
    parser.add_argument("overrides", nargs="*", help="run-config overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, ([f"model.path={args.model}"] if args.model else []) + args.overrides)
    if args.figure == "publication":
        from cluster.models import resolve_model

        bench_publication(cfg, resolve_model(cfg.model.path), args.nodes, args.repeats)
    else:
        bench_control_plane(cfg, args.workers, args.tokens, args.seconds)


if __name__ == "__main__":
    main()
