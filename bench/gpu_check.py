"""GPU check (needs CUDA; vLLM and Ray not involved, so no weight publication): runs the CUDA tests
(tests/test_gpu.py: PPO update, checkpoint round trip, reference, reward model, a one-rank NCCL learner
group with its sharded checkpoint, LoRA), then prints figures for the learner on this device: seconds per
update and bytes per rank, full fine-tuning against LoRA, and the sharded checkpoint's save and load times.

    python bench/gpu_check.py                          # the tiny model
    python bench/gpu_check.py --model DIR --batch 64   # another HF model directory
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages, installed or not

from cluster.models import prepare_tiny
from core.config import PPOConfig
from learner.distributed import free_port
from learner.learner import LearnerSetup, PPOLearner
from tests.test_gpu import rollouts


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def figures(model: str, batch_size: int, lora_rank: int) -> None:
    label = f"LoRA r={lora_rank}" if lora_rank else "full"
    torch.cuda.reset_peak_memory_stats()
    learner = PPOLearner(model, PPOConfig(device="cuda", autocast="bfloat16", minibatch_size=16, lora_rank=lora_rank),
                         LearnerSetup(inference_dtype="bfloat16", rendezvous=f"tcp://127.0.0.1:{free_port()}"))
    try:
        batch = rollouts(batch_size, learner.policy.config.vocab_size, random.Random(0))
        for r in batch:
            r.ref_logprobs = list(r.logprobs)
        times = [timed(lambda: learner.update(batch))[0] for _ in range(3)]
        mib = {k: v / 2**20 for k, v in learner.memory().items()}
        print(f"{label}: update {min(times):.2f} s (best of 3, {batch_size} sequences), per rank weights "
              f"{mib['weights']:.0f} + gradients {mib['gradients']:.0f} + optimizer {mib['optimizer']:.0f} MiB, "
              f"peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        with tempfile.TemporaryDirectory() as tmp:
            save, _ = timed(lambda: learner.save_checkpoint(tmp))
            load, _ = timed(lambda: learner.load_checkpoint(tmp))
        print(f"{label}: sharded checkpoint save {save:.2f} s, load {load:.2f} s")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: the tiny test model)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per update")
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine")
    model = args.model or str(prepare_tiny())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, model {model}")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py"],
                           env={**os.environ, "RLHF_GPU_MODEL": model})
    for rank in (0, args.lora_rank):
        figures(model, args.batch, rank)
    sys.exit(tests.returncode)


if __name__ == "__main__":
    main()
