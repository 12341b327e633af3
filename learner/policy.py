"""The policy a learner trains, and how it is built: the causal LM of a model directory, LoRA adapters on it
with `ppo.lora_rank` (learner/lora.py), the value head that GAE reads, and the two as one module, sharded over
a learner group (learner/distributed.py). Also what leaves it: its weights for the generation workers and
its HF export.

Critic choice: a scalar value head on the policy's last hidden state rather than a separate value model. On a
CPU the learner's forward/backward dominates a PPO step, and a separate critic of the same size would double
that cost and the optimiser memory. The price is that value-loss gradients reach the shared trunk, so the
value loss is weighted down (`ppo.vf_coef`) and the head gets its own, larger learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from core.forward import load_causal_lm, torch_dtype
from learner import distributed, lora
from learner.distributed import PolicyWithValue

if TYPE_CHECKING:
    from core.config import PPOConfig


@dataclass
class Policy:
    lm: torch.nn.Module  # the HF causal LM (a peft model under LoRA)
    value_head: torch.nn.Linear | None  # None for the critic-free estimators
    module: PolicyWithValue  # both as one module: the FSDP root unit in a learner group
    tokenizer: object
    lora: bool  # LoRA adapters train, the base stays frozen

    @property
    def pad_id(self) -> int:
        return self.lm.config.pad_token_id or 0

    def optimizer(self, cfg: PPOConfig) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters, the value head at its own learning rate (build it after
        sharding: FSDP2 replaces the parameters)."""
        groups = [{"params": [p for p in self.lm.parameters() if p.requires_grad], "lr": cfg.lr}]
        if self.value_head is not None:
            groups.append({"params": self.value_head.parameters(), "lr": cfg.value_lr})
        # fused: one kernel over all parameters, ~4x faster a step than the default on a 2-core CPU
        return torch.optim.AdamW(groups, weight_decay=0.0, fused=True)

    def for_workers(self, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, whole tensor in `dtype` on `device`), one tensor at a time: the adapters under LoRA (the
        workers hold the base), else every parameter (a tied LM head under its own name too: vLLM-CPU keeps its
        own copy). Gathering a sharded tensor is a collective: every rank must iterate."""
        named = (lora.adapter_weights(self.lm).items() if self.lora
                 else self.lm.named_parameters(remove_duplicate=False))
        for name, tensor in named:
            yield name, distributed.local(tensor.detach()).to(device, dtype)

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the LM with HF names, adapters merged; the value head), gathered on rank 0 (empty on the others),
        on the CPU. Every rank must call it."""
        state = distributed.full_state_dict(self.module)
        head = {k[len("value_head."):]: v.detach().cpu() for k, v in state.items() if k.startswith("value_head.")}
        if self.lora:
            return {k: v.detach().cpu() for k, v in lora.merged_weights(self.lm, state, "policy.").items()}, head
        return {k[len("policy."):]: v.detach().cpu() for k, v in state.items() if k.startswith("policy.")}, head

    def save(self, out: Path, write: bool, extra: dict) -> None:
        """The HF model directory `out` (transformers and vLLM load it) plus `value_head.pt` (the head and
        `extra`), written where `write` (rank 0); every rank must call it."""
        lm, head = self.full_state()
        if write:
            out.mkdir(parents=True, exist_ok=True)
            (self.lm.get_base_model() if self.lora else self.lm).save_pretrained(out, state_dict=lm)
            self.tokenizer.save_pretrained(out)
            torch.save({"value_head": head, **extra}, out / "value_head.pt")


def build_policy(model_path: str, cfg: PPOConfig, device: torch.device, world_size: int) -> Policy:
    """The policy of `model_path` as `cfg` says (dtype, LoRA, a value head for GAE), sharded over `world_size`
    ranks when there are several."""
    from transformers import AutoTokenizer

    lm = load_causal_lm(model_path, cfg.dtype, device)
    if cfg.lora_rank:
        lm = lora.add_adapters(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    value_head = None
    if cfg.advantage == "gae":
        hidden = lm.config.hidden_size
        value_head = torch.nn.Linear(hidden, 1).to(device, torch_dtype(cfg.dtype))
        torch.nn.init.normal_(value_head.weight, std=1.0 / (hidden + 1))  # as in lm-human-preferences
        torch.nn.init.zeros_(value_head.bias)
    module = PolicyWithValue(lm, value_head)
    if world_size > 1:
        distributed.shard(module, device)
    return Policy(lm, value_head, module, AutoTokenizer.from_pretrained(model_path), bool(cfg.lora_rank))
