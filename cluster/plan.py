"""`rlhf plan`: the memory each role needs for a model and a run config, and the smallest learner group
that fits a device, computed from the model's config.json alone (no weights are read).

    learner rank   weights, gradients and AdamW moments (1/N of each with N ranks), the layer being gathered
                   (with N > 1), activations of its share of a minibatch, the float32 LM-head logits
    reference      the model's weights
    worker         the weights in the workers' dtype, and the KV cache: configured, and what the configured
                   request needs

Activations are an upper bound: every sequence at its longest (data.max_prompt_tokens +
generation.max_new_tokens) and no activation checkpointing. Per token and layer a Llama-shaped decoder
keeps about 7h + 3k + 4i values for its backward (h hidden, k key/value width, i MLP width: the norms'
inputs and outputs, q/k/v before and after the rotary embedding, the attention output, the SwiGLU's four
i-wide tensors), with an attention kernel that keeps no s x s matrix (PyTorch's SDPA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GROUP_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


@dataclass
class ModelShape:
    """What the plan needs from a model's config.json."""

    name: str
    parameters: int
    layers: int
    hidden: int
    kv_width: int  # key/value heads x head dim
    intermediate: int
    vocab: int
    root_parameters: int  # outside the decoder layers: embeddings, final norm, an untied LM head
    linears: dict[str, list[tuple[int, int]]]  # linear layer name -> (in, out) of each such layer

    def adapter_parameters(self, rank: int, targets: str) -> int:
        """Parameters of LoRA adapters of `rank` on the linear layers named in `targets`."""
        names = [t.strip() for t in targets.split(",") if t.strip()]
        return sum(rank * (i + o) for name in names for i, o in self.linears.get(name, []))

    @property
    def layer_parameters(self) -> int:
        return (self.parameters - self.root_parameters) // self.layers


def model_shape(model_dir: str) -> ModelShape:
    """The shape of the model whose config.json is in `model_dir`, counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no config.json there; give an HF model directory (only its "
                          f"config.json is read), e.g. cluster/configs/shapes/llama-3.1-8b")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    in_layers = sum(p.numel() for layer in layers for p in layer.parameters())
    linears: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(name=path.name, parameters=parameters, layers=len(layers), hidden=config.hidden_size,
                      kv_width=getattr(config, "num_key_value_heads", heads) * head_dim,
                      intermediate=config.intermediate_size, vocab=config.vocab_size,
                      root_parameters=parameters - in_layers, linears=linears)


def learner_rank(shape: ModelShape, cfg, ranks: int) -> dict[str, float]:
    """Bytes per learner rank with `ranks` ranks, by kind."""
    ppo = cfg.ppo
    weight = BYTES[ppo.dtype]
    compute = weight if ppo.autocast in ("none", "auto") else BYTES[ppo.autocast]
    rows = math.ceil(ppo.minibatch_size / ranks)
    tokens = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
    per_token_layer = 7 * shape.hidden + 3 * shape.kv_width + 4 * shape.intermediate
    # With LoRA only the adapters train: the frozen base has no gradients and no optimizer state.
    trained = shape.adapter_parameters(ppo.lora_rank, ppo.lora_targets) if ppo.lora_rank else shape.parameters
    # A learner that holds the reference also holds the frozen base (LoRA's, or a copy of the initial policy).
    frozen = shape.parameters if cfg.reference_in_learner else 0
    plan = {
        "weights": (frozen + trained) * weight / ranks,
        "gradients": trained * weight / ranks,
        "optimizer": 2 * trained * weight / ranks,  # AdamW's two moments, in the weights' dtype
        "activations": rows * tokens * shape.layers * per_token_layer * compute,
        # float32 logits of the response positions: the logits, their log-softmax and its gradient
        "logits": 3 * rows * cfg.generation.max_new_tokens * shape.vocab * 4,
    }
    if ranks > 1:  # FSDP2 gathers the root unit and a layer (and prefetches the next) to compute
        plan["gathered"] = (shape.root_parameters + 2 * shape.layer_parameters) * weight
    return plan


def worker(shape: ModelShape, cfg) -> dict[str, float]:
    gen = cfg.generation
    dtype = BYTES.get(gen.dtype, 2)
    per_token = 2 * shape.layers * shape.kv_width * dtype  # a key and a value per layer
    sequences = gen.prompts_per_request * gen.samples_per_prompt
    return {"weights": shape.parameters * dtype, "kv_cache": gen.kv_cache_gib * GIB,
            "kv_needed": sequences * (cfg.data.max_prompt_tokens + gen.max_new_tokens) * per_token}


def smallest_group(shape: ModelShape, cfg, device_bytes: float) -> int | None:
    """The fewest learner ranks whose per-rank memory fits `device_bytes` (None if even 512 do not)."""
    for n in GROUP_SIZES:
        if sum(learner_rank(shape, cfg, n).values()) <= device_bytes:
            return n
    return None


def report(model_dir: str, cfg, ranks: int, device_gib: list[float]) -> str:
    """The plan as `rlhf plan` prints it."""
    shape = model_shape(model_dir)
    ppo, gen = cfg.ppo, cfg.generation
    rank = learner_rank(shape, cfg, ranks)
    work = worker(shape, cfg)
    tokens = cfg.data.max_prompt_tokens + gen.max_new_tokens

    def gib(x: float) -> str:
        return f"{x / GIB:.2f}" if x < 10 * GIB else f"{x / GIB:.0f}"

    tuning = (f"LoRA rank {ppo.lora_rank}: {shape.adapter_parameters(ppo.lora_rank, ppo.lora_targets) / 1e6:.1f}M "
              f"adapter parameters" if ppo.lora_rank else "full fine-tuning")
    reference = ("none: the base with adapters off, in the learner" if ppo.lora_rank
                 else "a frozen copy in the learner (counted above)" if cfg.reference_in_learner
                 else f"weights {gib(shape.parameters * BYTES[ppo.dtype])} GiB")
    lines = [
        f"model {shape.name}: {shape.parameters / 1e9:.2f}B parameters, {shape.layers} layers, hidden "
        f"{shape.hidden}, vocab {shape.vocab}",
        f"learner, per rank of {ranks} ({tuning}, {ppo.dtype} weights, AdamW, minibatch {ppo.minibatch_size} x "
        f"{tokens} tokens, autocast {ppo.autocast}):",
        "  " + ", ".join(f"{k} {gib(v)}" for k, v in rank.items()) + f"  = {gib(sum(rank.values()))} GiB",
        f"reference: {reference}",
        f"generation worker ({gen.dtype}): weights {gib(work['weights'])} GiB, KV cache {gib(work['kv_cache'])} GiB "
        f"configured ({gen.prompts_per_request} x {gen.samples_per_prompt} sequences of {tokens} tokens need "
        f"{gib(work['kv_needed'])} GiB)",
    ]
    for size in device_gib:
        n = smallest_group(shape, cfg, size * GIB)
        fits = (f"{n} rank{'s' if n > 1 else ''} ({gib(sum(learner_rank(shape, cfg, n).values()))} GiB each)" if n
                else f"more than {GROUP_SIZES[-1]} ranks")
        if n and n > ppo.minibatch_size:
            fits += f", with ppo.minibatch_size raised to at least {n} (one row per rank)"
        lines.append(f"smallest learner group on {size:g} GiB devices: {fits}")
    return "\n".join(lines)
