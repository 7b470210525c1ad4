"""Tensor-parallel x data-parallel process groups, and the `mpu` object DeepSpeed takes.

Ranks are laid out Megatron's way, tensor-parallel fastest: rank = dp_rank * tp + tp_rank, so a
TP group is `tp` consecutive ranks (one node's GPUs when tp <= GPUs per node) and a DP group holds
the ranks with the same tp_rank. There is no pipeline parallelism: its group is the rank alone.

The mpu deliberately has no `initialize_sequence_parallel` attribute: with one, DeepSpeed's ZeRO-1/2
ignores the mpu (and so the DP group) altogether.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from neva_core.errors import NevaError


@dataclass(frozen=True)
class Layout:
    """Where one rank sits in a TP x DP world."""

    world_size: int
    tp: int
    rank: int

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    def tp_group_ranks(self, dp_rank: int) -> list[int]:
        return [dp_rank * self.tp + tp_rank for tp_rank in range(self.tp)]

    def dp_group_ranks(self, tp_rank: int) -> list[int]:
        return [dp_rank * self.tp + tp_rank for dp_rank in range(self.dp)]


def make_layout(world_size: int, tp: int, rank: int) -> Layout:
    """Validate the degrees up front, naming every factor."""
    if world_size < 1 or tp < 1:
        raise NevaError(f"world size {world_size} and --tp {tp} must both be at least 1")
    if world_size % tp:
        raise NevaError(f"world size {world_size} is not divisible by --tp {tp}: the world must be "
                        f"tensor-parallel {tp} x data-parallel N (N = world size / {tp})")
    if not 0 <= rank < world_size:
        raise NevaError(f"rank {rank} is outside the world of {world_size} processes")
    return Layout(world_size=world_size, tp=tp, rank=rank)


class ModelParallelUnit:
    """This rank's TP, DP and (trivial) pipeline groups, with the accessors DeepSpeed's `mpu=` calls.

    Build it on every rank in the same order (`init_parallel_groups`): creating a group is collective.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        # Every rank creates every group, in the same order, keeping its own.
        for dp_rank in range(layout.dp):
            group = dist.new_group(layout.tp_group_ranks(dp_rank))
            if dp_rank == layout.dp_rank:
                self.tp_group = group
        for tp_rank in range(layout.tp):
            group = dist.new_group(layout.dp_group_ranks(tp_rank))
            if tp_rank == layout.tp_rank:
                self.dp_group = group
        for rank in range(layout.world_size):
            group = dist.new_group([rank])
            if rank == layout.rank:
                self.pipeline_group = group

    # tensor (= model) parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """The global rank of TP rank 0 in this rank's TP group."""
        return self.layout.tp_group_ranks(self.layout.dp_rank)[0]

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.layout.dp_group_ranks(self.layout.tp_rank)

    # pipeline parallel: none
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.pipeline_group


def init_parallel_groups(tp: int) -> ModelParallelUnit:
    """The groups of this process, once torch.distributed is initialised (collective: call it on every rank)."""
    if not dist.is_initialized():
        raise NevaError("torch.distributed is not initialised: start the training processes through `neva train`")
    return ModelParallelUnit(make_layout(dist.get_world_size(), tp, dist.get_rank()))
