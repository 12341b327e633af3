"""`rlhf chaos`: a fault schedule run against a live job, and a report of what each fault cost.

    rlhf chaos --simulate                                        the default schedule, a simulated cluster
    rlhf chaos --fault 2:kill-worker --fault 4:hang-worker:20 train.steps=8    on the cluster of RAY_ADDRESS

Each fault fires once the job has finished its step (`STEP:KIND[:SECONDS]`):
    kill-worker      SIGKILL generation worker 0's process (Ray restarts it; it reloads the current weights)
    hang-worker:S    SIGSTOP generation worker 0 for S seconds, then SIGCONT (the watchdog finds it stuck)
    stop-reward:S    SIGSTOP the reward replica for S seconds, then SIGCONT (scoring calls retry)
    kill-learner     SIGKILL learner rank 0 (the job restarts its roles from the last checkpoint)
    kill-node        kill the node of generation worker 0 at once, as a preempted machine dies

A signal is sent by a small task on the victim's node, so a fault works on a real cluster as on a simulated
one. The job is whole again at the first step finished after the fault ended with as many generation
workers up as before it and none loading weights; the report gives that time and the ledger's counts then
(drawn = trained + pending, none twice), and is written to `train.output_dir/chaos.json`. Once the last
fault is over the job is stopped as `ray job stop` stops it (a checkpoint, the summary), so `train.steps` is
an upper bound.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path

import ray

from core.config import ConfigError, RunConfig, replace_section

log = logging.getLogger(__name__)

KINDS = {"kill-worker": False, "hang-worker": True, "stop-reward": True, "kill-learner": False, "kill-node": False}
DEFAULT_SCHEDULE = ["2:kill-worker", "4:hang-worker:20", "6:stop-reward:15", "8:kill-learner", "10:kill-node"]
# The simulated cluster of `--simulate`: a head for the driver, spare room for every role a fault takes (either
# generation node holds both of the tiny job's workers and the reference, wherever Ray put them before the other died).
SIMULATED_NODES = {"learner-a": (2, {"learner": 1}), "learner-b": (2, {"learner": 1}),
                   "generation-a": (3, {"generation": 2, "reference": 1}),
                   "generation-b": (3, {"generation": 2, "reference": 1}),
                   "reward-a": (1, {"reward": 1}), "reward-b": (1, {"reward": 1})}


@dataclasses.dataclass
class Fault:
    step: int
    kind: str
    seconds: float = 0.0
    # filled in as it runs
    victim: str = ""
    at_s: float | None = None  # since the job's start
    ended_s: float | None = None
    whole_s: float | None = None  # time from the fault's start until the job was whole again
    counts: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        parts = spec.split(":")
        try:
            step, kind, seconds = int(parts[0]), parts[1], float(parts[2]) if len(parts) > 2 else 0.0
        except (IndexError, ValueError):
            raise ConfigError(f"--fault {spec!r}: give STEP:KIND[:SECONDS], e.g. 4:hang-worker:20") from None
        if kind not in KINDS:
            raise ConfigError(f"--fault {spec!r}: unknown fault {kind!r}; choose one of {', '.join(KINDS)}")
        if KINDS[kind] != (seconds > 0) or step < 1:
            takes = "a duration in seconds" if KINDS[kind] else "no duration"
            raise ConfigError(f"--fault {spec!r}: {kind} takes {takes} and the step it fires after (>= 1)")
        return cls(step, kind, seconds)


@ray.remote(num_cpus=0)
def _signal(pid: int, sig: int, ppid_named: str = "") -> str:
    """Send `sig` to `pid` on this node (with `ppid_named`: to this task's parent, which must be that process:
    a worker's parent is its node's raylet)."""
    import os

    import psutil

    if ppid_named:
        parent = psutil.Process(os.getppid())
        if ppid_named not in parent.name():
            raise RuntimeError(f"this task's parent is {parent.name()}, not the {ppid_named}; kill the node by hand")
        pid = parent.pid
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # SIGCONT to a process the job has already replaced
        return f"pid {pid} already gone"
    return f"pid {pid}"


def _on_node(node_id: str, pid: int, sig: int, ppid_named: str = "") -> str:
    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.get(_signal.options(scheduling_strategy=strategy).remote(pid, sig, ppid_named), timeout=60)


def _answered(call, timeout_s: float = 120.0):
    """`call()`, again while its actor is being restarted or replaced by the job (a fault before this one)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return call()
        except (ray.exceptions.RayActorError, ValueError):  # restarting; not (yet) registered under its name
            if time.time() > deadline:
                raise
            time.sleep(1.0)


def _worker_0() -> tuple[str, int]:
    stats = _answered(lambda: ray.get(ray.get_actor("generation-worker-0").stats.remote(), timeout=30))
    return stats["node_id"], stats["pid"]


def _reward_replica() -> tuple[str, int]:
    from ray import serve

    from reward_server.server import APP_NAME

    handle = serve.get_app_handle(APP_NAME)
    return _answered(lambda: (handle.node_id.remote().result(timeout_s=30), handle.pid.remote().result(timeout_s=30)))


def _learner() -> tuple[str, int]:
    def ask():
        rank = ray.get_actor("learner")
        return ray.get(rank.node_id.remote(), timeout=30), ray.get(rank.pid.remote(), timeout=30)

    return _answered(ask)


class Schedule:
    """Fires the faults beside a running job (a thread that reads its metrics.jsonl) and times its recovery."""

    def __init__(self, faults: list[Fault], out: Path, simulated=None):
        self.faults, self.out, self.simulated = sorted(faults, key=lambda f: f.step), out, simulated
        self.started = time.time()
        self.errors: list[BaseException] = []
        self.job_done = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos")

    def records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        return [r for line in path.read_text().splitlines() if (r := json.loads(line))["step"]]

    def _wait(self, condition, what: str, timeout: float = 900.0):
        deadline = time.time() + timeout
        while (found := condition()) is None:
            if time.time() > deadline:
                raise TimeoutError(f"chaos: the job did not get to {what} within {timeout:.0f} s")
            time.sleep(0.2)
        return found

    def _run(self) -> None:
        try:
            for fault in self.faults:
                self._wait(lambda: next((r for r in self.records() if r["step"] >= fault.step), None),
                           f"step {fault.step}")
                before = self.records()[-1]
                self._inject(fault)
                whole = self._wait(lambda: next((r for r in self.records() if self._whole(r, before, fault)), None),
                                   f"a whole step after {fault.kind}")
                fault.whole_s = whole["wall_time"] - self.started - fault.at_s
                fault.counts = {k: whole[f"stream/{k}"] for k in ("prompts_drawn", "prompts_trained",
                                                                  "prompts_pending", "prompts_trained_twice")}
                log.warning("chaos: %s whole again after %.1f s (step %d)", fault.kind, fault.whole_s, whole["step"])
        except BaseException as exc:  # noqa: BLE001 - reported by `report`
            self.errors.append(exc)
        if not self.job_done:
            from cluster.job import request_stop

            log.warning("chaos: the schedule is done; stopping the job (as `ray job stop` does)")
            request_stop()

    def _whole(self, record: dict, before: dict, fault: Fault) -> bool:
        """Whether the step of `record` shows the job whole after `fault`: begun after the fault ended, as many
        workers as `before` it and none loading weights, and a lost worker seen lost (and so counted back)."""
        begun = record["wall_time"] - record["timing/step"] - self.started
        noticed = (fault.kind not in ("kill-worker", "kill-node")
                   or record["stream/worker_failures"] > before["stream/worker_failures"])
        return (begun > fault.ended_s and noticed and record["stream/workers"] >= before["stream/workers"]
                and record["stream/workers_syncing"] == 0)

    def _inject(self, fault: Fault) -> None:
        fault.at_s = time.time() - self.started
        if fault.kind in ("kill-worker", "hang-worker"):
            node, pid = _worker_0()
            sig = signal.SIGKILL if fault.kind == "kill-worker" else signal.SIGSTOP
            fault.victim = f"generation-worker-0 ({_on_node(node, pid, sig)})"
        elif fault.kind == "stop-reward":
            node, pid = _reward_replica()
            fault.victim = f"reward replica ({_on_node(node, pid, signal.SIGSTOP)})"
        elif fault.kind == "kill-learner":
            node, pid = _learner()
            fault.victim = f"learner rank 0 ({_on_node(node, pid, signal.SIGKILL)})"
        else:
            node, _ = _worker_0()
            if self.simulated is not None:
                name = self.simulated.name_of(node)
                self.simulated.kill(name)
                fault.victim = f"node {name}"
            else:
                fault.victim = f"node {node[:8]} (raylet {_on_node(node, 0, signal.SIGKILL, 'raylet')})"
        log.warning("chaos: %s after step %d: %s", fault.kind, fault.step, fault.victim)
        if fault.seconds:
            time.sleep(fault.seconds)
            _on_node(node, pid, signal.SIGCONT)
        fault.ended_s = time.time() - self.started

    def report(self) -> str:
        rows = ["| fault | after step | at | victim | whole again after | drawn = trained + pending | trained twice |",
                "|---|---|---|---|---|---|---|"]
        for f in self.faults:
            c = f.counts
            rows.append(f"| {f.kind}{f':{f.seconds:g} s' if f.seconds else ''} | {f.step} | "
                        + (f"{f.at_s:.0f} s" if f.at_s is not None else "not fired") + f" | {f.victim or '-'} | "
                        + (f"{f.whole_s:.1f} s" if f.whole_s is not None else "not within the run") + " | "
                        + (f"{c['prompts_drawn']} = {c['prompts_trained']} + {c['prompts_pending']}" if c else "-")
                        + f" | {c.get('prompts_trained_twice', '-')} |")
        return "\n".join(rows)


def start_simulated():
    """A simulated cluster (cluster/simulated.py) with the nodes of SIMULATED_NODES, Ray connected to it."""
    from cluster.launch import ACTOR_ENV
    from cluster.simulated import SimulatedCluster

    cluster = SimulatedCluster(head_cpus=2)
    for name, (cpus, resources) in SIMULATED_NODES.items():
        cluster.add(name, cpus, **resources)
    ray.init(address=cluster.address, logging_level="warning", runtime_env={"env_vars": ACTOR_ENV})
    return cluster


def chaos(cfg: RunConfig, specs: list[str], simulate: bool) -> list[Fault]:
    """Run the job `cfg` describes with the faults `specs`; print and write the report. Returns the faults."""
    from cluster.job import train
    from core import storage

    faults = [Fault.parse(spec) for spec in specs or DEFAULT_SCHEDULE]
    if storage.is_uri(cfg.train.output_dir):
        raise ConfigError(f"train.output_dir = {cfg.train.output_dir}: rlhf chaos follows the job through its "
                          f"metrics.jsonl, so give it a local path")
    last = max(f.step for f in faults)
    if cfg.train.steps <= last + 1:
        raise ConfigError(f"train.steps = {cfg.train.steps}, but the last fault fires after step {last}: give at least "
                          f"{last + 2} so the job can be seen whole after it")
    if simulate:
        cfg = replace_section(cfg, "train", role_resources=True)
    if any(f.kind == "kill-learner" for f in faults) and cfg.train.max_learner_restarts < 1:
        raise ConfigError("a kill-learner fault needs train.max_learner_restarts >= 1")
    if simulate and ray.is_initialized():
        raise ConfigError("--simulate starts a simulated cluster and its own Ray: run it outside a Ray job")
    simulated = start_simulated() if simulate else None
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # the schedule reads this run's steps only
    schedule = Schedule(faults, out, simulated)
    schedule.thread.start()
    try:
        summary = train(cfg)
    finally:
        schedule.job_done = True
        if simulated is not None:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            simulated.shutdown()
    table = schedule.report()
    print(f"\n=== rlhf chaos: {len(faults)} faults, {summary['steps']} steps, {summary['total_minutes']:.1f} min; "
          f"at the end drawn {summary['stream/prompts_drawn']} = trained {summary['stream/prompts_trained']} + pending "
          f"{summary['stream/prompts_pending']}, trained twice {summary['stream/prompts_trained_twice']} ===\n{table}")
    (out / "chaos.json").write_text(json.dumps({"faults": [dataclasses.asdict(f) for f in faults],
                                                "summary": summary}, indent=1, default=str))
    if schedule.errors:
        raise RuntimeError(f"chaos: the schedule did not finish: {schedule.errors[0]}") from schedule.errors[0]
    return faults
