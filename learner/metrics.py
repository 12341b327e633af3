"""The one place metrics leave the job: a JSON-lines file, W&B (offline unless configured), and a
progress line per step for the person watching."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, output_dir: str, config: dict, wandb_mode: str = "offline", project: str = "rlhf-ray",
                 total_steps: int = 1, resume_id: str | None = None, first_step: int = 1):
        """`resume_id`: the W&B run of a job this one resumes, continued rather than started anew."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.total_steps = total_steps
        self.first_step = first_step  # a resumed run's ETA counts the steps this process ran
        self.started = time.perf_counter()
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=project, config=config, mode=wandb_mode, dir=str(self.dir),
                                    name=self.dir.name, id=resume_id, resume="allow" if resume_id else None)
            log.info("W&B run %s (%s) in %s", self.wandb.id, wandb_mode, self.wandb.dir)

        self.run_id = self.wandb.id if self.wandb is not None else None

    def _to_wandb(self, send) -> None:
        """`send(run)` if W&B is on. W&B failing (its background process gets `ray job stop`'s SIGTERM too,
        say) turns W&B off with a warning; it never stops the job, and metrics.jsonl goes on."""
        if self.wandb is None:
            return
        try:
            send(self.wandb)
        except Exception as exc:  # noqa: BLE001 - whatever W&B raises, the training goes on
            log.warning("W&B stopped working (%s: %s); logging to %s only from here on", type(exc).__name__,
                        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "", self.jsonl.name)
            self.wandb = None
            _let_go_of_wandb()

    def checkpoint(self, path: Path, step: int) -> None:
        """Record a checkpoint as a W&B model artifact (a reference to the files, not a copy of them)."""
        def send(run):
            import wandb

            artifact = wandb.Artifact(f"checkpoint-{run.id}", type="model", metadata={"step": step})
            artifact.add_reference(Path(path).resolve().as_uri(), checksum=False)
            run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

        self._to_wandb(send)

    def log(self, step: int, metrics: dict, jsonl_only: dict | None = None) -> None:
        """`jsonl_only`: values for metrics.jsonl alone (lists W&B would not chart)."""
        record = {"step": step, "time": round(time.perf_counter() - self.started, 2), "wall_time": time.time(),
                  **metrics, **(jsonl_only or {})}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self._to_wandb(lambda run: run.log(metrics, step=step))

    def progress(self, step: int, m: dict) -> str:
        """One line a person can read: rewards, KL, version lag, throughput, stage times, ETA."""
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step - self.first_step + 1, 1) * (self.total_steps - step)
        evals = (f" | held-out gold {m['eval/gold_reward_mean']:+.3f} proxy {m['eval/proxy_reward_mean']:+.3f}"
                 if "eval/gold_reward_mean" in m else "")
        stages = " ".join(f"{k.split('/')[1]} {v:.1f}s" for k, v in m.items()
                          if k.startswith("timing/") and not k.endswith("_total"))
        line = (f"step {step}/{self.total_steps} | reward {m['rollout/score_mean']:+.3f}{evals} | "
                f"kl {m['kl/mean']:.2f} (beta {m['kl/coef']:.3f}) | lag {m['version/lag_mean']:.1f} | "
                f"{m['throughput/tokens_per_s']:.0f} tok/s | {stages} | ETA {eta / 60:.1f} min")
        print(line, flush=True)
        return line

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        def send(run):
            import wandb

            run.log({name: wandb.Table(columns=columns, data=rows)})

        self._to_wandb(send)

    def abandon(self) -> None:
        """Close without a summary: the job goes on in a new attempt (which continues the W&B run)."""
        self.jsonl.close()
        self._to_wandb(lambda run: run.finish(exit_code=1))

    def close(self, summary: dict) -> None:
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.jsonl.close()
        def send(run):
            run.summary.update(summary)
            run.finish()

        self._to_wandb(send)


def _let_go_of_wandb() -> None:
    """Tear down this process's W&B connection now, so that W&B's exit hook does not try again and print
    a traceback at exit; the teardown itself fails the same way, quietly."""
    import wandb

    try:
        wandb.teardown(exit_code=1)
    except Exception:  # noqa: BLE001 - W&B is already broken; nothing here may stop the job
        pass


class MemoryWatch:
    """Peak memory used on this machine while the job runs (all processes: driver, Ray, every role),
    sampled once a second, above what was in use when the watch started."""

    def __init__(self, interval_s: float = 1.0):
        import threading

        import psutil

        def used() -> int:
            vm = psutil.virtual_memory()  # one sample: total and available from the same moment
            return vm.total - vm.available

        self._used = used
        self.baseline = self._used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, self._used())

    def peak_gib(self) -> float:
        return (self.peak - self.baseline) / 2**30

    def stop(self) -> float:
        self._stop.set()
        return self.peak_gib()
