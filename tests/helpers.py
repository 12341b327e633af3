"""What more than one test file uses: a learner on the tiny model and rollouts for it, comparisons of what an
update changed; a whole job on the tiny model, and what the whole-job tests read from a run while it goes and
after it (the steps its metrics file holds, waiting for a condition, the exactly-once accounting of its
summary); a local S3 server for their outputs."""

import json
import logging
import os
import random
import time
from contextlib import contextmanager

import torch

from cluster.commands import DEFAULT_CONFIG
from core.config import PPOConfig, load_config
from core.rollout import Rollout
from learner.distributed import free_port
from learner.learner import LearnerSetup, PPOLearner


def steps_done(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    complete = path.read_text().split("\n")[:-1]  # not a last line the job is still writing
    return max((json.loads(line)["step"] for line in complete), default=0)


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


# --- a learner on the tiny model ---------------------------------------------------------------------
def make_learner(tiny, **options) -> PPOLearner:
    # GAE and its value head unless a test says otherwise: rollouts() gives every row its own prompt
    cfg = PPOConfig(**{"autocast": "none", "threads": 1, "minibatch_size": 8, "advantage": "gae", **options})
    return PPOLearner(tiny, cfg, LearnerSetup(inference_dtype="float32"))


def rollouts(learner, count=8, seed=0, finished=True) -> list[Rollout]:
    """Random token rollouts whose behaviour log-probs are the learner's own (an on-policy sample)."""
    rng = random.Random(seed)
    vocab = learner.policy.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))] for _ in range(count)]
    responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))] for _ in range(count)]
    own = learner.logprobs(prompts, responses)
    return [Rollout(prompt_index=i, prompt_ids=p, response_ids=r, text="", logprobs=lp, version=0, worker="w",
                    finished=finished, score=float(i % 4), ref_logprobs=list(lp))
            for i, (p, r, lp) in enumerate(zip(prompts, responses, own))]


def grouped(learner, seed=0, count=8, size=2) -> list[Rollout]:
    """`size` responses to each of `count / size` prompts (one group each), the first scored +1, the others -1."""
    batch = rollouts(learner, count=count, seed=seed)
    for i, r in enumerate(batch):
        r.prompt_index, r.prompt_ids = i // size, batch[i - i % size].prompt_ids
        r.score = 1.0 if i % size == 0 else -1.0
        r.logprobs = r.ref_logprobs = learner.logprobs([r.prompt_ids], [r.response_ids])[0]
    return batch


def with_sgd(learner):
    """The learner steps with plain SGD and no gradient clip, so that the change of every weight is -lr times
    its gradient: comparing changes then compares gradients. (AdamW's first step is about lr * sign(g), so
    weights after it hide a gradient wrong by a constant factor.)"""
    learner.optimizer = torch.optim.SGD([{"params": g["params"], "lr": g["lr"]}
                                         for g in learner.optimizer.param_groups])
    learner.cfg.max_grad_norm = 1e9
    return learner


def assert_same_changes(start: dict, a: dict, b: dict, rtol: float = 1e-4) -> None:
    """Two learners that started at `start` changed every weight alike: |delta_a - delta_b| <= rtol |delta_b| per
    tensor (a gradient doubled anywhere fails it), give or take the rounding of the weights themselves (a change
    of a weight near 1 is known to half a float32 step of 1, 6e-8), and the update did change the weights."""
    assert a.keys() == b.keys() == start.keys()
    moved = 0.0
    for name in start:
        da, db = a[name] - start[name], b[name] - start[name]
        moved = max(moved, db.abs().max().item())
        rounding = torch.finfo(start[name].dtype).eps * start[name].abs().max().item() * da.numel() ** 0.5
        assert (da - db).norm() <= rtol * db.norm() + rounding, f"{name}: {(da - db).norm():.3g} vs {db.norm():.3g}"
    assert moved > 1e-6


def snapshot(learner) -> dict:
    return {k: v.clone() for k, v in learner.weights().items()}


# --- a whole job on the tiny model -------------------------------------------------------------------
TINY = DEFAULT_CONFIG.parent / "tiny.yaml"


def run(tmp_path, *overrides):
    from cluster.job import train

    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", f"reward.port={free_port()}", *overrides])
    summary = train(cfg)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, steps


# --- generation workers against the learner ------------------------------------------------------------
# Both sides compute in float32 here, so the remaining gap is kernel order (vLLM's CPU attention and
# oneDNN matmuls vs PyTorch's): measured below 1e-4; 2e-3 leaves room and still catches a stale weight.
LOGPROB_TOL = 2e-3


def max_gap(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


# every command that reads a run config, with the arguments it needs
COMMAND_LINES = [["train"], ["chaos", "--simulate"], ["serve-reward"], ["make-demos"], ["sft"], ["make-preferences"],
                 ["train-rm"], ["west-of-n"], ["best-of-n"], ["rm-report"], ["dpo"], ["ilql"], ["online-rlhf"],
                 ["elo", "--player", "a=b"], ["scale", "--workers", "2"], ["status"],
                 ["plan", "--model", "embedded:tiny"], ["config"]]
