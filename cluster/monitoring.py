"""Custom Ray metrics of a training job, exported through Ray's Prometheus endpoint (`ray start --head
--metrics-export-port=8080`, then `http://<node>:8080/metrics`) and charted by the dashboard when
Prometheus and Grafana are set up. Ray prefixes each name with `ray_`; counters end in `_total`.

The driver sets the job-wide gauges after every step; each generation worker counts its own tokens
and tokens/s (tagged with its name), see `actors/generation.py`.
"""

from __future__ import annotations

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


class JobMetrics:
    """The driver's gauges; `record(metrics)` sets those whose key is in the step's metrics."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        self.gauges = {key: Gauge(name, description=help, tag_keys=("run",)).set_default_tags({"run": run_name})
                       for key, (name, help) in STEP_GAUGES.items()}

    def record(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]))


class WorkerMetrics:
    """A generation worker's token counter and throughput gauge, tagged with its name."""

    def __init__(self, worker: str):
        from ray.util.metrics import Counter, Gauge

        tags = {"worker": worker}
        self.tokens = Counter("rlhf_generated_tokens", description="response tokens generated",
                              tag_keys=("worker",)).set_default_tags(tags)
        self.rate = Gauge("rlhf_worker_tokens_per_second", description="tokens/s of the worker's last generate call",
                          tag_keys=("worker",)).set_default_tags(tags)

    def record(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.tokens.inc(tokens)
        self.rate.set(tokens / seconds if seconds > 0 else 0.0)
