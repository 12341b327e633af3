"""GPU check (prints figures; needs CUDA; vLLM not involved): the learner's PPO update, its checkpoint round
trip, the reference model and reward-model training, on `cuda` with bf16 autocast, as a run config with
`ppo.device=cuda reference.device=cuda rm.device=cuda` would place them.

    python bench/gpu_check.py --model ~/.cache/rlhf_ray/tiny-llama
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from actors.reference import ReferenceModel
from actors.rollout import Rollout
from cluster.config import PPOConfig, ReferenceConfig, RewardModelConfig
from learner.learner import PPOLearner
from reward_server.preferences import PreferencePair
from reward_server.reward_model import RewardModelTrainer


def rollouts(n: int, vocab: int, rng: random.Random) -> list[Rollout]:
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 24))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 32))]
        out.append(Rollout(prompt_index=i, prompt_ids=prompt, response_ids=response, text="", worker="check",
                           logprobs=[-2.0] * len(response), version=0, finished=True, score=rng.uniform(-1, 1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rng = random.Random(0)

    reference = ReferenceModel(args.model, ReferenceConfig(device="cuda", dtype="bfloat16"))
    learner = PPOLearner(args.model, PPOConfig(device="cuda", autocast="bfloat16", minibatch_size=16),
                         inference_dtype="bfloat16")
    vocab = learner.policy.config.vocab_size
    batch = reference.ref_logprobs(rollouts(args.batch, vocab, rng))
    for step in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = learner.update(batch)
        torch.cuda.synchronize()
        print(f"update {step + 1}: {time.perf_counter() - start:.2f} s, loss {metrics['loss/total']:+.4f}, "
              f"kl {metrics['kl/mean']:.3f}, version {metrics['version/learner']}")
        assert all(v == v for v in metrics.values()), "a NaN metric"
    weights = learner.weights()
    assert all(w.device.type == "cpu" and w.dtype == torch.bfloat16 for w in weights.values())

    with tempfile.TemporaryDirectory() as tmp:
        learner.save_checkpoint(tmp)
        again = PPOLearner(args.model, PPOConfig(device="cuda", autocast="bfloat16", minibatch_size=16),
                           inference_dtype="bfloat16")
        assert again.load_checkpoint(tmp) == 3
        same = all(torch.equal(a, b) for a, b in zip(learner.policy.state_dict().values(),
                                                     again.policy.state_dict().values()))
        print(f"checkpoint round trip on cuda: version 3, weights equal: {same}")
        assert same

    good, bad = ["What a lovely, wonderful day!", "Great news, I am so happy."], ["Awful, terrible.", "Sad and bad."]
    pairs = [PreferencePair(prompt=f"request {i}", chosen=good[i % 2], rejected=bad[i % 2]) for i in range(64)]
    cfg = RewardModelConfig(base=args.model, device="cuda", autocast="bfloat16", epochs=3, batch_size=8, lr=1e-4)
    start = time.perf_counter()
    history = RewardModelTrainer(args.model, cfg).train(pairs[:48], pairs[48:])
    print(f"reward model on cuda: {time.perf_counter() - start:.1f} s, held-out accuracy "
          f"{history[-1]['eval/accuracy']:.2f}")
    print("GPU check passed")


if __name__ == "__main__":
    main()
