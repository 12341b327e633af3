"""What a generation worker runs inside its vLLM engine's process: loading a policy version.

vLLM's async engine runs the model in a process of its own, reached through `collective_rpc`, which
carries only plain data. So the worker writes each bucket of a new version as a safetensors file in
shared memory and this extension (mixed into vLLM's worker by `worker_extension_cls`) loads it, in the
three steps of vLLM's own `reload_weights`: begin, one `load_weights` per bucket, finish (which repacks
the weights the way the engine's first load did; a per-tensor copy would not fit the repacked layout).
"""

from __future__ import annotations

import logging

# vLLM's reload warns "RotaryEmbedding: Failed to load weights" at every weight sync: the rotary cos/sin
# cache is computed from the model config, is in no checkpoint, and vLLM keeps it as it was. After a sync
# the engine's log-probs match the learner's (tests/test_weight_sync.py), so the line is noise.
ROTARY_RELOAD_WARNING = "RotaryEmbedding: Failed to load weights"
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    lambda record: not record.getMessage().startswith(ROTARY_RELOAD_WARNING))


class WeightLoading:
    """Mixed into vLLM's worker class; every name starts with `rlhf_` so as not to clash with vLLM's."""

    def _rlhf_in_config(self, step):
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            return step(self.model_runner.get_model())

    def rlhf_begin_reload(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        self._rlhf_in_config(initialize_layerwise_reload)

    def rlhf_load_file(self, path: str) -> int:
        """Load the tensors of one safetensors file (HF parameter names); returns how many."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        self._rlhf_in_config(lambda model: model.load_weights(tensors.items()))
        return len(tensors)

    def rlhf_end_reload(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        self._rlhf_in_config(lambda model: finalize_layerwise_reload(model, self.vllm_config.model_config))
        self.model_runner.reset_lora_state()
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()
