"""LoRA on the learner, in-process on the tiny model: only the adapters and the value head train, the
reference (the base with adapters off) does not move, the HF export holds the merged policy, and a target
module or rank the model lacks is refused by name."""

import pytest
import torch

from cluster.models import prepare_tiny
from core.config import ConfigError
from tests.helpers import make_learner, rollouts


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(prepare_tiny())


def test_lora_trains_the_adapters_and_the_reference_stays_the_base(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.forward import token_logprobs

    learner = make_learner(tiny, lora_rank=4, lr=3e-3)
    batch = rollouts(learner)
    prompts, responses = [r.prompt_ids for r in batch], [r.response_ids for r in batch]
    base = {k: v.clone() for k, v in learner.policy.named_parameters() if "lora_" not in k}
    reference = learner.ref_logprobs(prompts, responses)
    gap = lambda a, b: max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))  # noqa: E731
    assert gap(learner.logprobs(prompts, responses), reference) < 1e-6  # LoRA's B starts at zero

    learner.update(batch)
    assert all(torch.equal(v, base[k]) for k, v in learner.policy.named_parameters() if "lora_" not in k)
    assert gap(learner.ref_logprobs(prompts, responses), reference) < 1e-6
    moved = learner.logprobs(prompts, responses)
    assert gap(moved, reference) > 1e-3
    held = learner.memory()
    assert held["optimizer"] < held["weights"] / 10  # AdamW moments for the adapters and the value head only

    learner.save(str(tmp_path / "export"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    assert gap(token_logprobs(exported, prompts, responses, pad_id=learner.pad_id), moved) < 1e-4


def test_a_target_or_rank_the_model_lacks_is_refused_by_name(tiny):
    with pytest.raises(ConfigError, match=r"names \['qkv_proj'\] linear layers of this model; its linear layers are"):
        make_learner(tiny, lora_rank=4, lora_targets="q_proj,qkv_proj")
    with pytest.raises(ConfigError, match=r"ppo.lora_rank = 512 is larger .* k_proj \(at most 64\)"):
        make_learner(tiny, lora_rank=512, lora_targets="k_proj")
