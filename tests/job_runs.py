"""What the whole-job tests read from a run while it goes and after it: the steps its metrics file holds,
waiting for a condition, the exactly-once accounting of its summary; and a local S3 server for their outputs."""

import json
import logging
import os
import time
from contextlib import contextmanager


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


@contextmanager
def s3_server():
    """A local S3-compatible server (moto) with a bucket `runs`, and the environment that points pyarrow at
    it; yields that environment (for Ray's runtime_env, so every node's roles see it too)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=env["AWS_ENDPOINT_URL"]).create_dir("runs")
    try:
        yield env
    finally:
        server.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
