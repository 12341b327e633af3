"""Custom Ray metrics of a training job, exported through Ray's Prometheus endpoint (`ray start --head
--metrics-export-port=8080`, then `http://<node>:8080/metrics`) and charted by the dashboard when
Prometheus and Grafana are set up. Ray prefixes each name with `ray_`; counters end in `_total`.

The driver sets the job-wide gauges after every step; each generation worker counts its own tokens
and tokens/s (tagged with its name), see `actors/generation.py`. `MemoryWatch` measures the job's peak
memory for its summary.

Ray drops a gauge's value from the endpoint once it has not been set for two report intervals (20 s
by default), and a PPO step on CPU takes minutes, so `HeldGauges` sets each gauge's last value again
every few seconds: a scrape at any moment sees it.
"""

from __future__ import annotations

import threading

# metrics.jsonl key -> (Ray metric name, description)
STEP_GAUGES = {
    "stream/buffer_depth": ("rlhf_buffer_depth", "scored rollouts waiting in the buffer"),
    "version/lag_mean": ("rlhf_policy_version_lag", "policy versions between the learner and the rollouts it trains on"),
    "version/learner": ("rlhf_policy_version", "the learner's policy version"),
    "rollout/score_mean": ("rlhf_reward_mean", "mean reward of the step's rollouts"),
    "kl/mean": ("rlhf_kl", "KL to the reference per response, nats"),
    "timing/step": ("rlhf_step_seconds", "seconds of the last PPO step"),
    "throughput/tokens_per_s": ("rlhf_tokens_per_second", "response tokens per second over the last step"),
    "stream/workers": ("rlhf_generation_workers", "generation workers in the job"),
    "stream/prompts_pending": ("rlhf_prompts_pending", "prompts issued and not yet trained on"),
    "eval/gold_reward_mean": ("rlhf_gold_reward", "held-out reward under the gold scorer"),
}


def refresh_interval_s(default: float = 5.0) -> float:
    """Half of Ray's metrics report interval (a gauge lives for two of them), at most `default`."""
    try:
        import ray

        return min(default, ray._config.metrics_report_interval_ms() / 2000)
    except Exception:  # noqa: BLE001 - a private Ray API; without it the default is well inside 20 s
        return default


class HeldGauges:
    """Gauges that keep their last value on the metrics endpoint until `close()`: a daemon thread sets
    each again every `refresh_s` seconds."""

    def __init__(self, refresh_s: float | None = None):
        self.values: dict[str, tuple] = {}  # key -> (gauge, last value)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresh_s = refresh_s or refresh_interval_s()
        threading.Thread(target=self._run, daemon=True, name="held-gauges").start()

    def set(self, key: str, gauge, value: float) -> None:
        with self._lock:
            self.values[key] = (gauge, value)
        gauge.set(value)

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            with self._lock:
                held = list(self.values.values())
            for gauge, value in held:
                gauge.set(value)

    def close(self) -> None:
        """Stop setting them: the values age out of the endpoint, as a finished job's should."""
        self._stop.set()


class JobMetrics:
    """The driver's gauges; `record(metrics)` sets those whose key is in the step's metrics."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        self.gauges = {key: Gauge(name, description=help, tag_keys=("run",)).set_default_tags({"run": run_name})
                       for key, (name, help) in STEP_GAUGES.items()}
        self.held = HeldGauges()

    def record(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in metrics:
                self.held.set(key, gauge, float(metrics[key]))

    def close(self) -> None:
        self.held.close()


class WorkerMetrics:
    """A generation worker's token counter and throughput gauge, tagged with its name."""

    def __init__(self, worker: str):
        from ray.util.metrics import Counter, Gauge

        tags = {"worker": worker}
        self.tokens = Counter("rlhf_generated_tokens", description="response tokens generated",
                              tag_keys=("worker",)).set_default_tags(tags)
        self.rate = Gauge("rlhf_worker_tokens_per_second", description="tokens/s of the worker's last generate call",
                          tag_keys=("worker",)).set_default_tags(tags)
        self.held = HeldGauges()  # lives as long as the worker

    def record(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.tokens.inc(tokens)
        self.held.set("rate", self.rate, tokens / seconds if seconds > 0 else 0.0)


class MemoryWatch:
    """Peak memory used on this machine while the job runs (all processes: driver, Ray, every role),
    sampled once a second, above what was in use when the watch started."""

    def __init__(self, interval_s: float = 1.0):
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

    def stop(self) -> None:
        self._stop.set()
