"""Fault-injection run (prints figures; not a test): the job runs, generation worker 0's process is
killed (SIGKILL) after step `--kill-at`, and the run goes on to `--steps`. It prints the stream's
counters (every prompt trained on exactly once?), how long the killed worker took to come back with the
current weights, and how long until a step's throughput was back to 90% of its median before the kill.

    .venv/bin/python bench/fault_injection.py                               # tiny model, 2 workers
    .venv/bin/python bench/fault_injection.py --config cluster/configs/default.yaml --kill-at 3 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray

from cluster.cli import DEFAULT_CONFIG
from cluster.config import load_config
from cluster.job import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG.parent / "tiny.yaml"))
    ap.add_argument("--kill-at", type=int, default=4, help="kill worker 0 after this step (%(default)s)")
    ap.add_argument("--steps", type=int, default=30, help="steps of the run (%(default)s)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fault_injection_"))
    cfg = load_config(args.config, [f"train.output_dir={out}", f"train.steps={args.steps}", "train.eval_every=1000",
                                    "train.wandb_mode=disabled", *args.overrides])
    killed_at: list[float] = []

    def kill_when_ready() -> None:
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and any(json.loads(line)["step"] >= args.kill_at
                                            for line in metrics.read_text().splitlines())):
            time.sleep(0.1)
        pid = ray.get(ray.get_actor("generation-worker-0").stats.remote())["pid"]
        killed_at.append(time.time())
        os.kill(pid, signal.SIGKILL)
        print(f"killed generation-worker-0 (pid {pid}) after step {args.kill_at}", flush=True)

    threading.Thread(target=kill_when_ready, daemon=True).start()
    summary = train(cfg)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["step"] > 0]
    before = statistics.median(s["throughput/tokens_per_s"] for s in steps[1:args.kill_at])
    back = next((s for s in steps if s["wall_time"] > killed_at[0] and s["throughput/tokens_per_s"] >= 0.9 * before
                 and s["stream/workers_syncing"] == 0), None)
    print("\n=== fault injection ===")
    print(f"config {args.config}, {cfg.generation.num_workers} workers, staleness {cfg.train.max_staleness}")
    for key in ("steps", "policy_version", "stream/prompts_drawn", "stream/prompts_trained",
                "stream/prompts_pending", "stream/prompts_trained_twice", "stream/prompts_reissued",
                "stream/worker_failures", "stream/workers_replaced", "stream/rollouts_dropped_stale"):
        print(f"{key:32s} {summary[key]}")
    print(f"{'worker back with current weights':32s} {summary['worker_recovery_s'][0]:.1f} s after the kill"
          if summary["worker_recovery_s"] else "the worker did not come back before the run ended")
    print(f"{'throughput before the kill':32s} {before:.0f} tok/s (median step)")
    print(f"{'full throughput again':32s} " + (f"{back['wall_time'] - killed_at[0]:.1f} s after the kill (step "
                                               f"{back['step']}, {back['throughput/tokens_per_s']:.0f} tok/s)"
                                               if back else "not within the run"))


if __name__ == "__main__":
    main()
