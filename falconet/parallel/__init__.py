"""Tensor parallelism on torch.distributed (gloo on CPU, NCCL on GPU): a model's heads,
MLP and vocabulary split over N ranks (plan.py), each rank loading only its shard
(load.py), rank 0 driving and the others following its plans (runtime.py)."""

from falconet.parallel.load import source_config
from falconet.parallel.plan import ShardConfig, TensorParallelError, check_tensor_parallel
from falconet.parallel.runtime import (
    TensorParallelLM,
    follow_checkpoint,
    launched_by_torchrun,
    start,
)

__all__ = [
    "ShardConfig",
    "TensorParallelError",
    "TensorParallelLM",
    "check_tensor_parallel",
    "follow_checkpoint",
    "launched_by_torchrun",
    "source_config",
    "start",
]
