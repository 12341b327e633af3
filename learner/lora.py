"""LoRA (Hu et al. 2021) on the policy with peft: `ppo.lora_rank > 0` trains low-rank adapters on the named
linear layers and leaves the base weights frozen.

Three things follow. The reference is the base with the adapters switched off, in the learner's own
process (no second copy of the base, no reference actor). A weight sync sends only the adapters, which
the workers' vLLM engines apply as a LoRA request (a new adapter id per version). Gradients and AdamW
moments exist for the adapters only (and the value head, trained in full).
"""

from __future__ import annotations

import torch

from core.config import ConfigError


def add_adapters(policy: torch.nn.Module, rank: int, alpha: float, targets: str, section: str = "ppo"
                 ) -> torch.nn.Module:
    """`policy` with LoRA adapters of `rank` on every linear layer named in `targets` (comma-separated
    module names, e.g. q_proj,v_proj); a name the model lacks, or a rank above a target's width, is refused
    (naming the config `section`'s field)."""
    from peft import LoraConfig, get_peft_model

    names = [t.strip() for t in targets.split(",") if t.strip()]
    linears = {name.rsplit(".", 1)[-1]: module for name, module in policy.named_modules()
               if isinstance(module, torch.nn.Linear)}
    missing = [t for t in names if t not in linears]
    if not names or missing:
        raise ConfigError(f"{section}.lora_targets names {missing or 'no'} linear layers of this model; its linear "
                          f"layers are {', '.join(sorted(linears))}")
    narrow = {t: min(linears[t].in_features, linears[t].out_features) for t in names}
    too_wide = {t: width for t, width in narrow.items() if rank > width}
    if too_wide:
        raise ConfigError(f"{section}.lora_rank = {rank} is larger than what these layers can take: "
                          + ", ".join(f"{t} (at most {w})" for t, w in too_wide.items()))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none")
    return get_peft_model(policy, config)


def adapter_config(policy) -> dict:
    """The adapter's config as peft writes adapter_config.json (what vLLM reads)."""
    config = policy.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def adapter_weights(policy) -> dict[str, torch.Tensor]:
    """The adapter tensors under the names peft saves them (adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(policy)


def merged_weights(policy, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The policy with the adapters folded into the base weights (W + scaling * B A, peft's merge), under the
    base model's own names, for the HF export: computed from `state`, the peft model's whole state dict with
    its keys under `prefix` (gathered from the learner ranks), so the model itself is neither copied nor
    changed."""
    root = "base_model.model."
    scaling = {name.removeprefix(root): module.scaling["default"] for name, module in policy.named_modules()
               if isinstance(getattr(module, "scaling", None), dict)}
    merged = {}
    for key, value in state.items():
        if not key.startswith(prefix) or ".lora_" in key:
            continue
        name = key[len(prefix):].removeprefix(root)
        layer, base, param = name.partition(".base_layer.")
        if base:
            name = f"{layer}.{param}"
            if param == "weight":
                a, b = (state[f"{prefix}{root}{layer}.lora_{ab}.default.weight"].float() for ab in "AB")
                value = (value.float() + scaling[layer] * (b @ a)).to(value.dtype)
        merged[name] = value
    return merged
