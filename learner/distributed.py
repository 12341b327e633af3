"""What a learner rank needs from torch.distributed: the process group among the ranks, FSDP2 sharding of
the policy with its value head, sums across ranks, full (gathered) weights, and sharded checkpoints that
another number of ranks can load.

One learner (`ppo.num_learners = 1`) has no process group unless it is one rank of a learner group, and
nothing here changes how it computes. With N ranks, every decoder layer is one FSDP2 unit and the rest
(embeddings, final norm, LM head, value head) is the root unit: a rank holds 1/N of the weights, the
gradients and the AdamW moments, and gathers one layer's weights at a time to compute.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from core.forward import response_forward


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as one module, so that one FSDP2 root unit covers the embeddings, the
    final norm, the (tied) LM head and the value head, which response_forward uses outside the decoder."""

    def __init__(self, policy: torch.nn.Module, value_head: torch.nn.Linear | None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head  # None for the critic-free estimators

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 logits (B, T, V), values (B, T); zeros without a value head) of the response positions."""
        logits, hidden = response_forward(self.policy, input_ids, attention_mask, response_len, temperature)
        if self.value_head is None:
            return logits, torch.zeros(logits.shape[:2], device=logits.device)
        # a new tensor, not a view: FSDP2 hooks the backward of this module's outputs
        return logits, self.value_head(hidden).squeeze(-1).float().clone()


def init_group(rendezvous: str, rank: int, world_size: int, device: torch.device, timeout_s: float) -> None:
    """Join the learner ranks' process group at `rendezvous` (tcp://host:port): gloo on CPU, NCCL on CUDA."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def free_port() -> int:
    """A TCP port free on this machine now, for a rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard(model: PolicyWithValue, device: torch.device) -> None:
    """FSDP2 over all ranks: one unit per decoder layer (the classes the HF model names as never to be
    split), the root unit for everything else. Parameters become DTensors in place; build the optimizer
    after this."""
    shard_layers(model, model.policy, device)


def shard_layers(root: torch.nn.Module, lm: torch.nn.Module, device: torch.device,
                 setting: str = "ppo.num_learners") -> None:
    """FSDP2 of `root` over all ranks, one unit per decoder layer of the HF model `lm` inside it and the root
    unit for the rest (`setting`: the config field to lower when the model cannot be sharded so)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    layer_classes = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(lm).__name__} names no decoder-layer class (_no_split_modules), so it cannot be "
                         f"sharded layer by layer; use {setting} = 1")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def shard_whole(module: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 of `module` over all ranks as one unit (a head beside the model, say)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=_mesh(device))


def _mesh(device: torch.device):
    """The one-dimensional device mesh of all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over the ranks (itself without a group), on every rank."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from what may be a DTensor (a sharded parameter's norm, say), gathering if needed."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole module's state dict, gathered onto rank 0 in CPU memory (empty on the other ranks; every
    rank must call it). Without a process group, the module's own state dict."""
    if not is_distributed():
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict into `module`, each rank taking its shards of it when the module is
    sharded (every rank must call it, each with the whole dict)."""
    if not is_distributed():
        module.load_state_dict(state)
        return
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


# --- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------------------


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank writes its shards of the weights and the optimizer state into the directory `path`; any
    number of ranks can load it (`load_sharded`)."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `save_sharded(path)` into this rank's shards, resharding from however many ranks wrote it.
    A checkpoint of another model or shape is refused before anything is loaded, naming what differs."""
    msd, osd = get_state_dict(model, optimizer)
    _check_fits(path, msd)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _check_fits(path: Path, model_state: dict) -> None:
    stored = {k[len("model."):]: meta for k, meta in dcp.FileSystemReader(str(path)).read_metadata()
              .state_dict_metadata.items() if k.startswith("model.")}
    missing = sorted(set(model_state) - set(stored))
    unexpected = sorted(set(stored) - set(model_state))
    wrong = [f"{k}: {tuple(stored[k].size)} in the checkpoint, {tuple(v.shape)} here"
             for k, v in model_state.items() if k in stored and tuple(stored[k].size) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} is of another model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, other shapes {wrong[:4]}; resume from a checkpoint of this "
                         f"model (train.resume) or start afresh")
