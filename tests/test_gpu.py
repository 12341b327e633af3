"""The CUDA paths (skipped without a GPU; vLLM not involved): the learner's PPO update, its checkpoint round
trip, the reference model and reward-model training, on `cuda` with bf16 autocast, as a run config with
`ppo.device=cuda reference.device=cuda rm.device=cuda` places them.

    .venv/bin/python -m pytest tests/test_gpu.py            # on a CUDA machine; RLHF_GPU_MODEL=DIR for another model
"""

import os
import random

import pytest
import torch

from actors.reference import ReferenceModel
from cluster.models import prepare_tiny
from core.config import PPOConfig, ReferenceConfig, RewardModelConfig
from core.preferences import PreferencePair
from core.rollout import Rollout
from learner.learner import LearnerSetup, PPOLearner
from learner.reward_model import RewardModelTrainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def model() -> str:
    return os.environ.get("RLHF_GPU_MODEL") or str(prepare_tiny())


def rollouts(n: int, vocab: int, rng: random.Random) -> list[Rollout]:
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 24))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 32))]
        out.append(Rollout(prompt_index=i, prompt_ids=prompt, response_ids=response, text="", worker="check",
                           logprobs=[-2.0] * len(response), version=0, finished=True, score=rng.uniform(-1, 1)))
    return out


def learner(model: str) -> PPOLearner:
    return PPOLearner(model, PPOConfig(device="cuda", autocast="bfloat16", minibatch_size=16, advantage="gae"),
                      LearnerSetup(inference_dtype="bfloat16"))


def test_ppo_update_reference_and_checkpoint_on_cuda(model, tmp_path):
    reference = ReferenceModel(model, ReferenceConfig(device="cuda"), dtype="float32", autocast="bfloat16")
    first = learner(model)
    batch = rollouts(64, first.policy.config.vocab_size, random.Random(0))
    refs = reference.ref_logprobs([r.prompt_ids for r in batch], [r.response_ids for r in batch])
    for r, lp in zip(batch, refs):
        r.ref_logprobs = lp
    # The reference computes as the learner does: at the start, its log-probs are the learner's own.
    own = first.logprobs([r.prompt_ids for r in batch[:4]], [r.response_ids for r in batch[:4]])
    assert max(abs(a - b) for row, ref in zip(own, refs) for a, b in zip(row, ref)) < 0.05
    for _ in range(3):
        metrics = first.update(batch)
        assert all(v == v for v in metrics.values()), "a NaN metric"
    assert metrics["version/learner"] == 3
    assert all(w.device.type == "cpu" and w.dtype == torch.bfloat16 for w in first.weights().values())

    assert first.save_checkpoint(str(tmp_path)) == 3
    again = learner(model)
    assert again.load_checkpoint(str(tmp_path)) == 3
    assert all(torch.equal(a, b) for a, b in zip(first.policy.state_dict().values(), again.policy.state_dict().values()))


def test_reward_model_trains_on_cuda(model):
    good, bad = ["What a lovely, wonderful day!", "Great news, I am so happy."], ["Awful, terrible.", "Sad and bad."]
    pairs = [PreferencePair(prompt=f"request {i}", chosen=good[i % 2], rejected=bad[i % 2]) for i in range(64)]
    cfg = RewardModelConfig(base=model, device="cuda", autocast="bfloat16", epochs=3, batch_size=8, lr=1e-4)
    history = RewardModelTrainer(model, cfg).train(pairs[:48], pairs[48:])
    assert history[-1]["eval/accuracy"] >= 0.95


def test_a_learner_rank_over_nccl_checkpoints_shards_and_lora_trains_on_cuda(model, tmp_path):
    """A learner group of one rank as cluster/launch.py starts it (NCCL process group), its sharded
    checkpoint round trip, and a LoRA learner whose reference is the base with adapters off."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from learner.distributed import free_port

    batch = rollouts(32, AutoConfig.from_pretrained(model).vocab_size, random.Random(1))
    for r in batch:
        r.ref_logprobs = list(r.logprobs)
    rank = PPOLearner(model, PPOConfig(device="cuda", autocast="bfloat16", minibatch_size=16, advantage="gae"),
                      LearnerSetup(inference_dtype="bfloat16", rendezvous=f"tcp://127.0.0.1:{free_port()}"))
    try:
        assert dist.get_backend() == "nccl"
        assert rank.update(batch)["version/learner"] == 1
        assert rank.save_checkpoint(str(tmp_path / "nccl")) == 1
        before = {k: v.clone() for k, v in rank.policy.state_dict().items()}
        rank.update(batch)
        assert rank.load_checkpoint(str(tmp_path / "nccl")) == 1
        assert all(torch.equal(before[k], v) for k, v in rank.policy.state_dict().items())
    finally:
        dist.destroy_process_group()

    lora = PPOLearner(model, PPOConfig(device="cuda", autocast="bfloat16", minibatch_size=16, advantage="gae", lora_rank=8),
                      LearnerSetup(inference_dtype="bfloat16"))
    prompts, responses = [r.prompt_ids for r in batch[:4]], [r.response_ids for r in batch[:4]]
    reference = lora.ref_logprobs(prompts, responses)
    for _ in range(2):
        assert all(v == v for v in lora.update(batch).values()), "a NaN metric"
    after = lora.ref_logprobs(prompts, responses)
    assert max(abs(a - b) for row, ref in zip(after, reference) for a, b in zip(row, ref)) < 1e-3
    assert lora.memory()["optimizer"] < lora.memory()["weights"] / 10
