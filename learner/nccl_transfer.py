"""Weight publication over NCCL through vLLM's own weight-transfer engine (`ppo.weight_transfer=nccl`; CUDA
learners and CUDA vLLM workers only).

The learner's rank 0 opens one NCCL group with the generation workers present at the start of the job (vLLM's
`NCCLTrainerWeightTransferEngine`, the workers built with `weight_transfer_config`); each version is then
broadcast from the learner's device memory to the workers' in packed buffers, the other learner ranks only
joining the gather of each sharded tensor. An NCCL group cannot grow, so this path keeps the worker set
fixed: the config refuses autoscaling with it, and a worker lost or added mid-run stops the job with a clear
error (resume from the last checkpoint). The object-store path (`ppo.weight_transfer=object_store`, the
default) is the elastic one.

No machine this project is developed on has CUDA vLLM, so this path has not run: it is kept this thin on
purpose, on vLLM's own engine, behind the same `publish()` the object-store path uses.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from vllm.distributed.weight_transfer import ParamMeta, WeightSource


class PolicySource(WeightSource):
    """The learner's publication (HF names, the workers' dtype, whole tensors gathered one at a time on every
    rank) as vLLM's weight source."""

    def __init__(self, tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]], meta: list[ParamMeta]):
        self._tensors, self._meta = tensors, meta

    def metadata(self) -> list[ParamMeta]:
        return self._meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._tensors()


def open_group(rank: int, workers: list, source: PolicySource):
    """vLLM's trainer-side NCCL engine between this learner rank (rank 0 sends) and `workers` (generation
    worker actor handles; see GenerationWorker's weight-transfer methods)."""
    import ray
    from vllm.distributed.weight_transfer import RayVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

    from learner.distributed import free_port

    info = NCCLTrainerInitInfo(rank=rank, master_address=ray.util.get_node_ip_address(), master_port=free_port(),
                               world_size=1 + len(workers))
    return NCCLTrainerWeightTransferEngine.trainer_init(info, client=RayVLLMWeightSyncClient(workers), source=source)
