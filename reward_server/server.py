"""The reward server: a Ray Serve deployment that scores (prompt, response) pairs.

Two doors lead to one batching queue:
- the training loop calls `await handle.score.remote(prompts, responses)` on a DeploymentHandle;
- people and outside tools `POST {route_prefix}/score` a JSON list of {"prompt", "response"}
  objects (schema at `{route_prefix}/openapi.json`, try-it page at `{route_prefix}/docs`).

Requests that arrive within `reward.batch_wait_timeout_s` of each other are scored together in one
scorer call of at most `reward.max_batch_size` items (Serve dynamic batching), which is what keeps
a reward model busy when several generation workers each send a few responses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from core.config import RewardConfig
from reward_server.scorers import ScoringError, make_scorer, score_checked

APP_NAME = "reward"

app = FastAPI(
    title="Reward server",
    description="Scores (prompt, response) pairs with the run's reward scorer. "
                "POST a JSON list of {prompt, response} objects to /score.")


class ScoreItem(BaseModel):
    prompt: str = Field(description="the user request")
    response: str = Field(description="the reply to score")


class ScoreReply(BaseModel):
    rewards: list[float] = Field(description="one reward per item, in request order")


class Health(BaseModel):
    status: str
    scorer: str = Field(description="the `reward.scorer` spec being served")


@dataclass
class _Chunk:
    """One caller's items (or a slice of them): the unit that the batching queue collects."""
    prompts: list[str]
    responses: list[str]
    first_index: int  # index of prompts[0] in the caller's request, for error messages


_ITEMS = TypeAdapter(list[ScoreItem])


def _parse_items(body: bytes) -> list[ScoreItem]:
    """The request's items, or a 422 that says what is wrong where (FastAPI's own error format)."""
    try:
        return _ITEMS.validate_json(body)
    except ValidationError as e:
        errors = [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors()]
        raise HTTPException(422, errors) from None


def _count_items(chunks: list[_Chunk]) -> int:
    # Serve sizes a batch with this, so `max_batch_size` counts pairs, not requests.
    return sum(len(c.prompts) for c in chunks)


def _split(rewards: list[float], chunks: list[_Chunk]) -> list[list[float]]:
    out, start = [], 0
    for chunk in chunks:
        out.append(rewards[start:start + len(chunk.prompts)])
        start += len(chunk.prompts)
    return out


# `@serve.ingress` round-trips the FastAPI app (which refers to this class) through cloudpickle
# when it decorates the class, and that swaps the class's methods for copies that see only the
# module globals defined by then: every helper the methods use must be defined above this line.
@serve.ingress(app)
class RewardServer:
    """Holds one scorer and serves it. Resources and replica options are set by
    `reward_app`, where the deployment is launched."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        if cfg.scorer.startswith("model:"):
            import torch

            # Ray gives a fractional-CPU replica one thread; a reward model wants the configured count.
            torch.set_num_threads(cfg.threads)
        self.scorer = make_scorer(cfg.scorer, device=cfg.device)
        # `@serve.batch` fixes its limits when the class is defined; the run's config applies
        # them here (one replica per process, so the class-wide setting is this replica's).
        self._score_batch.set_max_batch_size(cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One reward per pair, in order; raises ScoringError naming a bad item."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; "
                             f"pass one response per prompt")
        # A request larger than a batch is cut into batch-sized chunks: Serve rejects a single
        # batch item that is larger than `max_batch_size` on its own.
        size = self.cfg.max_batch_size
        chunks = [_Chunk(list(prompts[i:i + size]), list(responses[i:i + size]), i)
                  for i in range(0, len(prompts), size)]
        results = await asyncio.gather(*(self._score_batch(c) for c in chunks))
        rewards: list[float] = []
        for result in results:
            if isinstance(result, ScoringError):
                raise result
            rewards.extend(result)
        return rewards

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_count_items)
    async def _score_batch(self, chunks: list[_Chunk]) -> list[list[float] | ScoringError]:
        """Score the chunks of several callers in one scorer call and hand each its rewards.

        A failure is returned, not raised: raising would fail every caller in the batch, while
        only the one that sent the bad item should see an error.
        """
        if len(chunks) > 1:
            prompts = [p for c in chunks for p in c.prompts]
            responses = [r for c in chunks for r in c.responses]
            try:
                rewards = await self._run_scorer(prompts, responses, 0)
            except ScoringError:
                pass  # find out whose items fail by scoring each caller alone, below
            else:
                return _split(rewards, chunks)
        results: list[list[float] | ScoringError] = []
        for chunk in chunks:
            try:
                results.append(await self._run_scorer(chunk.prompts, chunk.responses,
                                                      chunk.first_index))
            except ScoringError as e:
                results.append(e)
        return results

    async def _run_scorer(self, prompts: list[str], responses: list[str],
                          first_index: int) -> list[float]:
        # In a thread, so the replica's event loop keeps accepting (and batching) requests
        # while a slow scorer, such as a reward model, runs.
        return await asyncio.to_thread(score_checked, self.scorer, prompts, responses, first_index)

    @app.post("/score", response_model=ScoreReply,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"type": "array", "items": ScoreItem.model_json_schema()}}}}},
              responses={401: {"description": "no or wrong bearer token (when the server requires one)"},
                         413: {"description": "too large a body, too many items or an over-long string"},
                         422: {"description": "the body is not a non-empty JSON list of items"},
                         500: {"description": "the scorer failed; the message names the item"}})
    async def http_score(self, request: Request) -> ScoreReply:
        # Checked in this order so that nothing is read from a caller without the token, and
        # nothing too large is parsed.
        self._check_token(request.headers.get("authorization", ""))
        items = _parse_items(await self._read_body(request))
        self._check_limits(items)
        try:
            rewards = await self.score([i.prompt for i in items], [i.response for i in items])
        except ScoringError as e:
            raise HTTPException(status_code=500, detail=str(e)) from e
        return ScoreReply(rewards=rewards)

    @app.get("/health", response_model=Health)
    async def health(self) -> Health:
        return Health(status="ok", scorer=self.cfg.scorer)

    async def pid(self) -> int:
        """This replica's process id (`rlhf chaos` stops it)."""
        import os

        return os.getpid()

    async def node_id(self) -> str:
        """The Ray node this replica runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _check_token(self, header: str) -> None:
        if not self.cfg.auth_token:
            return
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.cfg.auth_token.encode()):
            raise HTTPException(401, "this reward server requires `Authorization: Bearer <token>` with the "
                                     "token in its reward.auth_token", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the request body is {declared} bytes; this server accepts at most "
                                     f"{limit} (reward.max_request_bytes); split it into several requests")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise HTTPException(413, f"the request body is over {limit} bytes (reward.max_request_bytes); "
                                         f"split it into several requests")
        return bytes(body)

    def _check_limits(self, items: list[ScoreItem]) -> None:
        if not items:
            raise HTTPException(422, "the request holds no items; send a JSON list of "
                                     '{"prompt": ..., "response": ...} objects')
        if len(items) > self.cfg.max_items:
            raise HTTPException(413, f"the request holds {len(items)} items; this server accepts "
                                     f"at most {self.cfg.max_items} per request (reward.max_items); "
                                     f"split it into several requests")
        for index, item in enumerate(items):
            for name in ("prompt", "response"):
                length = len(getattr(item, name))
                if length > self.cfg.max_chars:
                    raise HTTPException(413, f"item {index}: the {name} is {length} characters; "
                                             f"this server accepts at most {self.cfg.max_chars} "
                                             f"(reward.max_chars)")


def reward_app(cfg: RewardConfig, resources: dict | None = None):
    """The Serve application of the reward server, with its resources from the config (and custom
    `resources`, see `cluster.launch.role_resources`)."""
    deployment = serve.deployment(RewardServer, name="RewardServer")
    return deployment.options(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "resources": resources or {}},
        # A batch of `max_batch_size` items may come from as many single-item requests, and all
        # of them must be let into the replica at once to be batched (Serve's default is 5).
        max_ongoing_requests=max(cfg.max_batch_size, 16),
        logging_config={"enable_access_log": cfg.access_log},
    ).bind(cfg)


def start_reward_server(cfg: RewardConfig, resources: dict | None = None, name: str = APP_NAME) -> DeploymentHandle:
    """Start Serve's HTTP proxy on the head node at `cfg.host:cfg.port` and deploy the reward app `name` at
    `cfg.route_prefix`; returns the handle the training loop scores through.

    Needs `ray.init` first. Serve keeps the HTTP address of its first start: if it already runs
    in this Ray cluster on another address, Serve warns and `reward_url(cfg)` will be wrong.
    """
    # One proxy, on the head node, where `reward_url` points: with a proxy on every node, nodes that
    # share a host (a simulated cluster, or several Ray nodes on one big machine) fight for the port.
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
    cfg = dataclasses.replace(cfg, auth_token=resolve_secret(cfg.auth_token))
    return serve.run(reward_app(cfg, resources), name=name, route_prefix=cfg.route_prefix)


def resolve_secret(value: str) -> str:
    """`env:NAME` -> the variable's value (so that the token stays out of configs and logs); else as given."""
    if not value.startswith("env:"):
        return value
    name = value[4:]
    if not os.environ.get(name):
        raise ValueError(f"reward.auth_token = {value!r} but the environment variable {name} is not set or empty")
    return os.environ[name]


def reward_url(cfg: RewardConfig) -> str:
    """The HTTP address of the score endpoint, as seen from this machine."""
    # A wildcard address is where the server listens, not one a client can connect to.
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/score"
