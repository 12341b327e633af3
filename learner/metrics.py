"""The one place metrics leave the job: a JSON-lines file, W&B (offline unless configured), and a
progress line per step for the person watching (core/progress.py: the rate-and-ETA line of any long loop)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from core import storage
from core.progress import Progress

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, output_dir: str, config: dict, wandb_mode: str = "offline", project: str = "rlhf-ray",
                 total_steps: int = 1, resume_id: str | None = None, first_step: int = 1):
        """`resume_id`: the W&B run of a job this one resumes, continued rather than started anew. For a storage
        URI `output_dir` the files are written in a local staging directory and uploaded at each checkpoint and
        at the close (the earlier metrics.jsonl of a resumed run is downloaded first, so nothing is lost)."""
        self.sync_to = output_dir if storage.is_uri(output_dir) else None
        self.dir = Path(tempfile.mkdtemp(prefix="rlhf-run-")) if self.sync_to else Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.sync_to and (remote := storage.Location(output_dir)).is_file("metrics.jsonl"):
            remote.download("metrics.jsonl", self.dir / "metrics.jsonl")
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.total_steps = total_steps
        # a resumed run's ETA counts the steps this process ran
        self.steps = Progress("training", total_steps - first_step + 1, "steps", every_s=None)
        self.started = time.perf_counter()
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=project, config=config, mode=wandb_mode, dir=str(self.dir),
                                    name=storage.basename(output_dir), id=resume_id, resume="allow" if resume_id else None)
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

    def sync(self) -> None:
        """Upload the run's files to its storage URI (nothing to do for a local output_dir)."""
        if self.sync_to:
            storage.Location(self.sync_to).upload(self.dir)

    def checkpoint(self, path: str, step: int) -> None:
        """Record a checkpoint as a W&B model artifact (a reference to the files, not a copy of them; on a
        storage URI, its address in the run's summary) and upload the run's files."""
        def send(run):
            import wandb

            if storage.is_uri(path):
                run.summary.update({"checkpoint/latest": path, "checkpoint/step": step})
                return
            artifact = wandb.Artifact(f"checkpoint-{run.id}", type="model", metadata={"step": step})
            artifact.add_reference(Path(path).resolve().as_uri(), checksum=False)
            run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

        self._to_wandb(send)
        self.sync()

    def log(self, step: int, metrics: dict, jsonl_only: dict | None = None) -> None:
        """`jsonl_only`: values for metrics.jsonl alone (lists W&B would not chart)."""
        record = {"step": step, "time": round(time.perf_counter() - self.started, 2), "wall_time": time.time(),
                  **metrics, **(jsonl_only or {})}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self._to_wandb(lambda run: run.log(metrics, step=step))

    def progress(self, step: int, m: dict) -> str:
        """One line a person can read: rewards, KL, version lag, throughput, stage times, ETA."""
        self.steps.advance(1)
        evals = (f" | held-out gold {m['eval/gold_reward_mean']:+.3f} proxy {m['eval/proxy_reward_mean']:+.3f}"
                 if "eval/gold_reward_mean" in m else "")
        stages = " ".join(f"{name} {m['timing/' + name]:.1f}s" for name in ("generate", "score", "reference"))
        kl = f"{m['kl/mean']:.2f}" if "kl/mean" in m else "not computed"  # no penalty, no reference forward
        line = (f"step {step}/{self.total_steps} | reward {m['rollout/score_mean']:+.3f}{evals} | "
                f"kl {kl} (beta {m['kl/coef']:.3f}) | lag {m['version/lag_mean']:.1f} | "
                f"{m['throughput/tokens_per_s']:.0f} tok/s | take {m['timing/take']:.1f}s ({stages}) "
                f"update {m['timing/update']:.1f}s publish {m['timing/publish']:.1f}s step {m['timing/step']:.1f}s"
                f" | ETA {self.steps.eta_s() / 60:.1f} min")
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
        self._release()

    def _release(self) -> None:
        """The files uploaded and the staging directory removed (for a storage URI)."""
        if self.sync_to:
            self.sync()
            shutil.rmtree(self.dir, ignore_errors=True)

    def close(self, summary: dict) -> None:
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.jsonl.close()
        def send(run):
            run.summary.update(summary)
            run.finish()

        self._to_wandb(send)
        self._release()


def _let_go_of_wandb() -> None:
    """Tear down this process's W&B connection now, so that W&B's exit hook does not try again and print
    a traceback at exit; the teardown itself fails the same way, quietly."""
    import wandb

    try:
        wandb.teardown(exit_code=1)
    except Exception:  # noqa: BLE001 - W&B is already broken; nothing here may stop the job
        pass
