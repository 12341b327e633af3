"""The generation worker as a stream of requests (vLLM's async engine, real, on the tiny model in a Ray
actor): a call answers when its own samples are done, whatever else the engine is still generating; the
log-probs a rollout carries are the engine's own; greedy replies repeat; a new policy version waits
for the requests in flight, then labels every token after it; and with in-flight updates it does not wait:
a reply across it holds tokens of both versions, each with the log-prob of the version that sampled it."""

import dataclasses

import pytest
import ray
from safetensors.torch import load_file

from actors.generation import GenerationWorker
from cluster.models import prepare_tiny
from core.config import build_config
from core.weights import publish_state_dict
from tests.helpers import LOGPROB_TOL, max_gap

pytestmark = pytest.mark.ray

PROMPT = [1, 42, 17, 99, 3]
LONG, SHORT = 200, 4  # tokens (the tiny random model almost never samples its end token)


def moved_weights(path: str):
    """The tiny model's weights with every linear layer scaled: another policy, published in several buckets."""
    state = load_file(f"{path}/model.safetensors")
    moved = {k: v * 1.5 if v.dim() == 2 and "embed" not in k else v for k, v in state.items()}
    return ray.put(publish_state_dict(moved, bucket_bytes=2**20))


@pytest.fixture(scope="module")
def tiny(ray_session):
    path = str(prepare_tiny())
    cfg = build_config({"generation": {"dtype": "float32", "kv_cache_gib": 0.25, "max_model_len": 256,
                                       "threads": 1, "max_new_tokens": 16}})
    inflight = dataclasses.replace(cfg.generation, inflight_updates=True)
    workers = [ray.remote(GenerationWorker).options(num_cpus=1).remote(f"s{i}", path, gen, seed=7)
               for i, gen in enumerate([cfg.generation, cfg.generation, inflight])]
    ray.get([w.stats.remote() for w in workers])
    yield path, workers
    for w in workers:
        ray.kill(w)


def test_the_log_probs_are_the_engines_own_and_greedy_replies_repeat(tiny):
    _, workers = tiny
    workers = workers[:2]
    prompts = [(i, PROMPT + [i + 5]) for i in range(3)]
    greedy = ray.get([w.generate.remote(prompts, 2, 0.0) for w in workers])
    assert [r.response_ids for r in greedy[0]] == [r.response_ids for r in greedy[1]]
    sampled = ray.get(workers[0].generate.remote(prompts, 2))
    assert [r.prompt_index for r in sampled] == [0, 0, 1, 1, 2, 2]  # n samples per prompt, in prompt order
    scored = ray.get(workers[0].score_logprobs.remote([r.prompt_ids for r in sampled],
                                                      [r.response_ids for r in sampled]))
    assert max_gap([r.logprobs for r in sampled], scored) < LOGPROB_TOL


def test_a_short_reply_comes_back_while_a_long_one_is_still_being_generated(tiny):
    _, (worker, *_) = tiny
    long = worker.generate.remote([(0, PROMPT)], 1, None, LONG)
    short = worker.generate.remote([(1, PROMPT)], 2, None, SHORT)
    done, _ = ray.wait([long, short], num_returns=1)
    assert done == [short] and not ray.wait([long], timeout=0)[0]
    assert [len(r.response_ids) for r in ray.get(short)] == [SHORT, SHORT]
    assert len(ray.get(long)[0].response_ids) == LONG


def test_a_new_version_waits_for_the_requests_in_flight_and_labels_what_follows(tiny):
    path, (worker, *_) = tiny
    weights = moved_weights(path)
    before = ray.get(worker.stats.remote())["version"]
    long = worker.generate.remote([(0, PROMPT)], 1, None, LONG)
    ray.get(worker.generate.remote([(1, PROMPT)], 1, None, 2))  # the long request is in the engine now
    load = worker.load_weights.remote(before + 1, weights)
    after = worker.generate.remote([(2, PROMPT)], 1, None, SHORT)
    assert ray.get(load) == before + 1
    assert ray.wait([long], timeout=0)[0], "the load waited for the request in flight"
    old, new = ray.get(long)[0], ray.get(after)[0]
    assert (old.version, new.version) == (before, before + 1)
    # the new version is what the engine samples and scores with now
    scored = ray.get(worker.score_logprobs.remote([new.prompt_ids], [new.response_ids]))
    assert max_gap([new.logprobs], scored) < LOGPROB_TOL
    assert max_gap([old.logprobs], ray.get(worker.score_logprobs.remote([old.prompt_ids], [old.response_ids]))) > 0.01


def test_with_inflight_updates_a_reply_across_a_new_version_has_tokens_of_both_each_with_its_log_prob(tiny):
    path, (_, at_start, keeper) = tiny  # at_start never loads: it holds version 0 throughout
    long = keeper.generate.remote([(0, PROMPT)], 1, None, LONG)
    ray.get(keeper.generate.remote([(1, PROMPT)], 1, None, 2))  # the long request is in the engine now
    assert ray.get(keeper.load_weights.remote(1, moved_weights(path))) == 1
    assert not ray.wait([long], timeout=0)[0], "the load did not wait for the request in flight"
    reply = ray.get(long)[0]
    switch = reply.token_versions.index(1)
    assert 0 < switch < LONG and reply.token_versions == [0] * switch + [1] * (LONG - switch)
    assert reply.version == 0  # the oldest of its tokens, which the staleness rule goes by
    old, new = (ray.get(w.score_logprobs.remote([reply.prompt_ids], [reply.response_ids]))[0]
                for w in (at_start, keeper))
    assert max_gap([reply.logprobs[:switch]], [old[:switch]]) < LOGPROB_TOL  # sampled by version 0
    assert max_gap([reply.logprobs[switch:]], [new[switch:]]) < LOGPROB_TOL  # sampled by version 1
    assert max_gap([old[switch:]], [new[switch:]]) > 0.01  # and the two versions differ there
