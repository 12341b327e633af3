"""The reward server on a local Ray: HTTP and DeploymentHandle give the scorer's rewards, bad
requests are refused with a reason, concurrent callers get their own answers back, and a bad
reward becomes an error that names the item."""

import math
import re
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from core.config import RewardConfig
from learner.distributed import free_port
from reward_server.scorers import ScoringError, VaderScorer
from reward_server.server import APP_NAME, reward_app, reward_url, start_reward_server

pytestmark = pytest.mark.ray

PROMPT = "my bike was stolen"
RESPONSES = ["What a wonderful chance to walk, you will love it!", "That is awful and sad.",
             "ok", "I am so happy for you, great news!", "Terrible, horrible day."]
NAN_MARKER = "<nan>"


def vader_or_nan(prompts, responses):
    """VADER, but NaN for a response holding NAN_MARKER: a scorer that breaks on demand."""
    rewards = VaderScorer().score(prompts, responses)
    return [math.nan if NAN_MARKER in r else x for r, x in zip(responses, rewards)]


def _items(responses, prompt=PROMPT):
    return [{"prompt": prompt, "response": r} for r in responses]


@pytest.fixture(scope="module")
def server(ray_session):
    cfg = RewardConfig(scorer="vader", port=free_port(), max_items=8, max_chars=200,
                       max_batch_size=16, batch_wait_timeout_s=0.05, num_cpus=0.5)
    try:
        handle = start_reward_server(cfg)
        with httpx.Client(timeout=30) as client:
            yield cfg, handle, client
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def nan_server(server):
    """A second app whose scorer returns NaN for marked responses."""
    cfg = RewardConfig(scorer="python:tests.test_reward_server:vader_or_nan", port=server[0].port,
                       route_prefix="/reward-nan", max_batch_size=16, batch_wait_timeout_s=0.05)
    handle = serve.run(reward_app(cfg), name="reward-nan", route_prefix=cfg.route_prefix)
    return cfg, handle, server[2]


def test_http_rewards_are_vader_rewards(server):
    cfg, _, client = server
    reply = client.post(reward_url(cfg), json=_items(RESPONSES))
    assert reply.status_code == 200, reply.text
    assert reply.json()["rewards"] == pytest.approx(VaderScorer().score([PROMPT] * 5, RESPONSES))


def test_health_and_openapi_schema_are_served(server):
    cfg, _, client = server
    base = f"http://127.0.0.1:{cfg.port}{cfg.route_prefix}"
    assert client.get(f"{base}/health").json() == {"status": "ok", "scorer": "vader"}
    schema = client.get(f"{base}/openapi.json")
    assert schema.status_code == 200 and "/score" in schema.json()["paths"]
    assert client.get(f"{base}/docs").status_code == 200


def test_handle_rewards_are_vader_rewards(server):
    _, handle, _ = server
    rewards = handle.score.remote([PROMPT] * 5, RESPONSES).result()
    assert rewards == pytest.approx(VaderScorer().score([PROMPT] * 5, RESPONSES))


@pytest.mark.parametrize("body, status, words", [
    (b"[{not json", 422, "JSON"),
    ({"prompt": "p", "response": "r"}, 422, "list"),
    ([{"prompt": "p"}], 422, "response"),
    ([{"prompt": 3, "response": "r"}], 422, "string"),
    ([], 422, "no items"),
    (_items(["ok"] * 9), 413, "at most 8"),
    (_items(["ok", "x" * 201]), 413, "item 1: the response is 201 characters"),
])
def test_bad_requests_are_refused_with_a_reason(server, body, status, words):
    cfg, _, client = server
    if isinstance(body, bytes):
        reply = client.post(reward_url(cfg), content=body,
                            headers={"content-type": "application/json"})
    else:
        reply = client.post(reward_url(cfg), json=body)
    assert reply.status_code == status, reply.text
    assert words in reply.text
    # The server keeps serving after a refusal.
    assert client.post(reward_url(cfg), json=_items(["great"])).status_code == 200


def test_concurrent_handle_calls_each_get_their_own_rewards(server):
    _, handle, _ = server
    vader = VaderScorer()
    # Requests of different sizes, one larger than max_batch_size (16), all in flight at once.
    requests = [[RESPONSES[(i + j) % 5] + " " * j for j in range(n)]
                for i, n in enumerate([1, 2, 3, 5, 8, 1, 40, 4])]
    pending = [handle.score.remote([f"prompt {i}"] * len(r), r) for i, r in enumerate(requests)]
    for responses, response in zip(requests, pending):
        assert response.result() == pytest.approx(vader.score([""] * len(responses), responses))


def test_a_nan_reward_is_an_error_naming_the_item(nan_server):
    cfg, handle, client = nan_server
    responses = ["fine", "broken " + NAN_MARKER, "good"]
    reply = client.post(reward_url(cfg), json=_items(responses))
    assert reply.status_code == 500 and "item 1" in reply.json()["detail"], reply.text
    assert "broken" in reply.json()["detail"]
    with pytest.raises(ScoringError, match="item 1"):
        handle.score.remote([PROMPT] * 3, responses).result()


def test_a_bad_item_fails_only_its_own_request(nan_server):
    _, handle, _ = nan_server
    # Sent together, so that they are likely to share a batch.
    bad = handle.score.remote([PROMPT] * 2, ["ok", NAN_MARKER])
    good = handle.score.remote([PROMPT] * 2, ["great", "sad"])
    assert good.result() == pytest.approx(VaderScorer().score([PROMPT] * 2, ["great", "sad"]))
    with pytest.raises(ScoringError, match="item 1"):
        bad.result()


@pytest.fixture(scope="module")
def guarded_server(server):
    """A third app that wants a bearer token and takes bodies of at most 2 KiB."""
    cfg = RewardConfig(scorer="vader", port=server[0].port, route_prefix="/reward-guarded", auth_token="s3cret",
                       max_request_bytes=2048)
    serve.run(reward_app(cfg), name="reward-guarded", route_prefix=cfg.route_prefix)
    return cfg, server[2]


@pytest.mark.parametrize("header, status", [(None, 401), ("Bearer wrong", 401), ("s3cret", 401),
                                            ("Basic s3cret", 401), ("Bearer s3cret", 200), ("bearer s3cret", 200)])
def test_a_server_with_a_token_serves_only_callers_that_send_it(guarded_server, header, status):
    cfg, client = guarded_server
    headers = {"Authorization": header} if header else {}
    reply = client.post(reward_url(cfg), json=_items(["great"]), headers=headers)
    assert reply.status_code == status, reply.text
    if status == 401:
        assert "Bearer" in reply.text and reply.headers["www-authenticate"] == "Bearer"


def test_an_oversized_body_is_refused_before_it_is_parsed(guarded_server):
    cfg, client = guarded_server
    auth = {"Authorization": "Bearer s3cret"}
    reply = client.post(reward_url(cfg), json=_items(["x" * 100] * 30), headers=auth)
    assert reply.status_code == 413 and "reward.max_request_bytes" in reply.text
    assert client.post(reward_url(cfg), json=_items(["great"]), headers=auth).status_code == 200


def serve_access_lines(app: str) -> int:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    access = re.compile(r" -- (CALL score OK|POST /\S*score 200) ")  # handle calls, HTTP requests
    return sum(bool(access.search(line)) for f in logs.glob(f"replica_{app}_*.log") for line in open(f))


def test_request_lines_stay_out_of_the_job_log_unless_asked_for(server):
    """A training job scores several times per step; Serve's access line for each would bury the step lines."""
    cfg, _, client = server
    logged = RewardConfig(scorer="vader", port=cfg.port, route_prefix="/reward-logged", access_log=True)
    serve.run(reward_app(logged), name="reward-logged", route_prefix=logged.route_prefix)
    for c in (cfg, logged, cfg, logged):
        assert client.post(reward_url(c), json=_items(RESPONSES[:1])).status_code == 200
    time.sleep(1)  # the replicas flush their log files
    assert serve_access_lines(APP_NAME) == 0
    assert serve_access_lines("reward-logged") == 2
