"""Weight broadcast: after the learner publishes new weights once (in buckets), every generation worker
(real vLLM, in Ray actors) gives the learner's own per-token log-probs and greedy outputs, and both changed."""

import pytest
import ray

from actors.generation import GenerationWorker, WeightSyncError
from cluster.models import prepare_tiny
from core.config import build_config
from core.prompts import load_prompts
from core.weights import publish_state_dict
from learner.learner import LearnerSetup, PPOLearner
from reward_server.scorers import VaderScorer
from tests.helpers import LOGPROB_TOL, max_gap

pytestmark = pytest.mark.ray

GREEDY_TOKENS = 12


@pytest.fixture(scope="module")
def setup(ray_session):
    from transformers import AutoTokenizer

    path = str(prepare_tiny())
    # A large learning rate so that one update visibly moves this tiny random model.
    cfg = build_config({"generation": {"dtype": "float32", "kv_cache_gib": 0.25, "max_model_len": 256,
                                       "threads": 1, "max_new_tokens": 16},
                        "ppo": {"lr": 3e-3, "autocast": "none", "minibatch_size": 8, "threads": 1,
                                "publish_bucket_mb": 0.5},  # several buckets, the embedding one of its own
                        "data": {"eval_size": 8}})
    workers = [ray.remote(GenerationWorker).options(num_cpus=1).remote(f"w{i}", path, cfg.generation, seed=i)
               for i in range(2)]
    learner = ray.remote(PPOLearner).options(num_cpus=1).remote(path, cfg.ppo, LearnerSetup(inference_dtype="float32"))
    train, _ = load_prompts(cfg.data, AutoTokenizer.from_pretrained(path))
    yield workers, learner, train[:8]
    for actor in workers + [learner]:
        ray.kill(actor)


def logprobs_everywhere(workers, learner, prompts, responses):
    return (ray.get([w.score_logprobs.remote(prompts, responses) for w in workers]),
            ray.get(learner.logprobs.remote(prompts, responses)))


def greedy_everywhere(workers, learner, prompts):
    outs = ray.get([w.generate.remote([(i, p) for i, p in enumerate(prompts)], 1, 0.0, GREEDY_TOKENS)
                    for w in workers])
    return [[r.response_ids for r in out] for out in outs], ray.get(learner.greedy.remote(prompts, GREEDY_TOKENS))


def test_broadcast_makes_workers_match_the_learner(setup):
    workers, learner, prompts = setup
    rollouts = ray.get(workers[0].generate.remote([(p.index, p.token_ids) for p in prompts], 2))
    prompt_ids = [r.prompt_ids for r in rollouts]
    response_ids = [r.response_ids for r in rollouts]

    before_workers, before_learner = logprobs_everywhere(workers, learner, prompt_ids, response_ids)
    for w in before_workers:
        assert max_gap(w, before_learner) < LOGPROB_TOL
    greedy_before, _ = greedy_everywhere(workers, learner, [p.token_ids for p in prompts])

    # One PPO update on scored rollouts changes the learner; nothing has reached the workers yet.
    for r, s in zip(rollouts, VaderScorer().score([""] * len(rollouts), [r.text for r in rollouts])):
        r.score, r.ref_logprobs = s + len(r.response_ids) / 10, list(r.logprobs)
    assert ray.get(learner.update.remote(rollouts))["version/learner"] == 1
    _, moved_learner = logprobs_everywhere(workers, learner, prompt_ids, response_ids)
    assert max_gap(moved_learner, before_learner) > 20 * LOGPROB_TOL

    weights = learner.publish.remote()  # published once, in buckets, loaded by every worker
    assert ray.get([w.load_weights.remote(1, weights) for w in workers]) == [1, 1]

    after_workers, after_learner = logprobs_everywhere(workers, learner, prompt_ids, response_ids)
    for w in after_workers:
        assert max_gap(w, after_learner) < LOGPROB_TOL
        assert max_gap(w, before_learner) > 20 * LOGPROB_TOL
    greedy_after, learner_greedy = greedy_everywhere(workers, learner, [p.token_ids for p in prompts])
    for out in greedy_after:
        assert out == learner_greedy
    assert greedy_after[0] != greedy_before[0]
    new = ray.get(workers[1].generate.remote([(0, prompts[0].token_ids)], 1))
    assert new[0].version == 1  # rollouts say which policy produced them


def test_mismatched_weights_are_refused_and_the_engine_keeps_working(setup):
    workers, learner, prompts = setup
    weights = ray.get(learner.weights.remote())
    name = "model.layers.0.mlp.down_proj.weight"
    bad = dict(weights)
    bad[name] = weights[name][:, :-1]
    with pytest.raises(WeightSyncError, match=f"wrong shapes.*{name}"):
        ray.get(workers[0].load_weights.remote(99, publish_state_dict(bad, 2**20)))
    out = ray.get(workers[0].generate.remote([(0, prompts[0].token_ids)], 1))
    assert out[0].version != 99 and out[0].response_ids

