"""How a learner's policy versions reach the generation workers, behind one verb: `publish(version)`, which
every rank of a learner group calls (gathering a sharded tensor is a collective) and which returns, on rank 0,
what the workers load (core/weights.py), None on the other ranks.

- `ObjectStorePublisher` (`ppo.weight_transfer=object_store`, the default; elastic): buckets of the weights
  (or LoRA's adapters) in Ray's object store, which any worker, a late joiner too, loads as they arrive.
- `NcclPublisher` (`ppo.weight_transfer=nccl`; CUDA learners and vLLM workers): a broadcast straight into the
  engines of a fixed set of workers, through vLLM's weight-transfer engine (learner/nccl_transfer.py).
"""

from __future__ import annotations

import torch

from core.weights import BroadcastWeights, BucketWriter, PublishedWeights
from learner import lora
from learner.policy import Policy


class ObjectStorePublisher:
    def __init__(self, policy: Policy, dtype: torch.dtype, bucket_mb: float, rank: int):
        """Publish `policy` in the workers' `dtype`, in buckets of `bucket_mb` MiB put by rank `rank` 0."""
        self.policy, self.dtype, self.bucket_bytes, self.rank = policy, dtype, int(bucket_mb * 2**20), rank

    def publish(self, version: int) -> PublishedWeights | None:
        """The policy's weights in buckets in the object store, one tensor gathered at a time."""
        adapter = lora.adapter_config(self.policy.lm) if self.policy.lora else None
        writer = BucketWriter(self.bucket_bytes, adapter) if self.rank == 0 else None
        for name, tensor in self.policy.for_workers(self.dtype, torch.device("cpu")):
            if writer is not None:
                writer.add(name, tensor)
        return writer.finish() if writer is not None else None


class NcclPublisher:
    def __init__(self, policy: Policy, dtype: torch.dtype, rank: int, workers: list, device: torch.device):
        """Open the NCCL group between this learner rank (rank 0 sends) and the generation `workers` (actor
        handles). Every rank must build one."""
        from learner import nccl_transfer

        self.rank = rank
        self.engine = nccl_transfer.open_group(rank, workers, weight_source(policy, dtype, device))

    def publish(self, version: int) -> BroadcastWeights | None:
        """Broadcast the weights into the workers' engines, then tag them with `version`."""
        import ray

        self.engine.send_weights()
        if self.rank != 0:
            return None
        ray.get([w.update_weight_version.remote(str(version)) for w in self.engine.client.handles])
        return BroadcastWeights(shapes={m.name: m.shape for m in self.engine.source.metadata()})


def weight_source(policy: Policy, dtype: torch.dtype, device: torch.device):
    """The publication as vLLM's WeightSource (learner/nccl_transfer.py): what the NCCL engine sends, tensors
    on the learner's `device`, and the metadata it sizes the workers' buffers from."""
    from vllm.distributed.weight_transfer import ParamMeta

    from learner.nccl_transfer import PolicySource

    meta = [ParamMeta(name, dtype, tuple(p.shape)) for name, p in policy.lm.named_parameters(remove_duplicate=False)]
    return PolicySource(lambda: policy.for_workers(dtype, device), meta)
