"""What the whole-job tests read from a run while it goes and after it: the steps its metrics file holds,
waiting for a condition, and the exactly-once accounting of its summary."""

import json
import time


def steps_done(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()), default=0)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(condition, timeout=300.0):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("the job did not get there in time")
        time.sleep(0.2)


def assert_every_prompt_once(summary):
    assert summary["stream/prompts_trained_twice"] == 0
    assert summary["stream/prompts_drawn"] == summary["stream/prompts_trained"] + summary["stream/prompts_pending"]
