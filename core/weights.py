"""One published policy version: the contract between the learner and the generation workers.

The learner publishes its weights in buckets of about `ppo.publish_bucket_mb`, gathering (with several
ranks) one tensor at a time and putting each bucket into the object store as soon as it is full, so the
learner's process never holds more than one bucket beyond its own weights. A worker loads the buckets as
they arrive, holding one at a time. Every worker, a late joiner included,
loads the same objects: the version stays in the object store until the next one replaces it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import torch

if TYPE_CHECKING:
    import ray


@dataclass
class PublishedWeights:
    """One policy version in the object store, in buckets of HF-named tensors."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every tensor's name and shape, in order
    buckets: list[ray.ObjectRef] = field(default_factory=list)  # each a dict name -> (NumPy array, dtype name)
    nbytes: int = 0  # all tensors' bytes
    adapter_config: dict | None = None  # LoRA: the tensors are an adapter with this peft config, not the weights

    def load_into(self, worker, version: int):
        """Have a generation worker (actors/generation.py) load these buckets as policy `version` (the worker's
        coroutine, which it awaits)."""
        if self.adapter_config is not None:
            return worker.load_adapter(version, self)
        return worker.load_buckets(version, self)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) bucket by bucket, fetching each bucket when the previous one has been consumed.
        The tensors are read-only views of the object store's shared memory: nothing is copied here."""
        import ray

        for ref in self.buckets:
            yield from _as_tensors(ray.get(ref)).items()

    async def fetched(self) -> AsyncIterator[tuple[int, dict[str, torch.Tensor]]]:
        """(index, {name: tensor}) bucket by bucket, as `tensors` but awaited: for an async actor, whose event
        loop (and every request on it) a `ray.get` would block."""
        for j, ref in enumerate(self.buckets):
            yield j, _as_tensors(await ref)


def _as_tensors(bucket: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """A bucket's NumPy arrays as tensors of their dtype: read-only views, whoever loads them copies them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(array).view(getattr(torch, dtype)) for name, (array, dtype) in bucket.items()}


@dataclass
class BroadcastWeights:
    """One policy version that the learner has broadcast into the workers' engines already (over NCCL,
    learner/publication.py): nothing to fetch, only the version to check."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def load_into(self, worker, version: int):
        return worker.confirm_broadcast(version)


class BucketWriter:
    """Collects tensors into buckets of at most `bucket_bytes` (a larger tensor is a bucket of its own) and
    puts each full bucket into the object store."""

    def __init__(self, bucket_bytes: int, adapter_config: dict | None = None):
        self.bucket_bytes = bucket_bytes
        self.published = PublishedWeights(adapter_config=adapter_config)
        self.bucket: dict[str, tuple] = {}  # name -> (NumPy array, torch dtype name)
        self.bucket_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.bucket and self.bucket_size + size > self.bucket_bytes:
            self._put()
        # As a NumPy view of the same bytes (bf16 as int16), which Ray writes straight into the object store
        # and a reader maps without a copy; a torch tensor would be pickled through a copy on both sides.
        dtype = str(tensor.dtype).removeprefix("torch.")
        flat = tensor.contiguous()
        self.bucket[name] = ((flat.view(torch.int16) if tensor.element_size() == 2 else flat).numpy(), dtype)
        self.bucket_size += size
        self.published.shapes[name] = tuple(tensor.shape)
        self.published.nbytes += size

    def _put(self) -> None:
        import ray

        self.published.buckets.append(ray.put(self.bucket))
        self.bucket, self.bucket_size = {}, 0

    def finish(self) -> PublishedWeights:
        if self.bucket:
            self._put()
        return self.published


def publish_state_dict(state_dict: dict[str, torch.Tensor], bucket_bytes: int) -> PublishedWeights:
    """A state dict already in memory, published in buckets (for tests and tools)."""
    writer = BucketWriter(bucket_bytes)
    for name, tensor in state_dict.items():
        writer.add(name, tensor)
    return writer.finish()
