"""The Python stack of a Ray actor's process, for a job that reports where it is stuck.

A stuck actor cannot answer a call (its one thread is the stuck one), so the stack is read from outside
the process: Ray's own record gives the actor's process id and node, and a small task on that node runs
py-spy (installed with `ray[default]`) against the process, without pausing it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import ray


def _py_spy_dump(pid: int) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    done = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True,
                          timeout=60)
    return done.stdout if done.returncode == 0 else f"py-spy failed: {done.stderr.strip()[:2000]}"


def actor_stack(name: str, namespace: str | None = None) -> str:
    """The Python stack of the live actor named `name`, or a line saying why it could not be read."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        actor = ray.get_actor(name, namespace=namespace)
        # Ray's record of the actor (from its control store; the actor itself is not asked)
        info = ray._private.state.actors(actor._actor_id.hex())
        pid, node = info["Pid"], info["Address"]["NodeID"]
        dump = ray.remote(_py_spy_dump).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        return f"process {pid} on node {node[:12]}:\n" + ray.get(dump.remote(pid), timeout=120)
    except Exception as exc:  # noqa: BLE001 - a diagnosis must not fail the report it is part of
        return (f"(the stack could not be read: {type(exc).__name__}: {str(exc)[:300]}; `ray stack` on the "
                f"actor's node prints every Ray worker's)")
