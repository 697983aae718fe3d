"""Process topology: tp × pp × dp ranks, megatron-core's parallel_state, DeepSpeed's mpu.

Rank order is megatron-core's default ("tp-cp-ep-dp-pp": tp fastest, then dp, then pp), which
is also DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model): both build
the same groups, so megatron's TP layers and DeepSpeed's data-parallel reduction agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    tp: int
    pp: int
    dp: int
    rank: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def model_parallel(self) -> bool:
        return self.tp > 1 or self.pp > 1

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)


def topology(tp: int, pp: int) -> Topology:
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ValueError(f"{world} processes cannot be split into tp={tp} × pp={pp} × dp "
                         f"(train.nproc must be a multiple of tp × pp)")
    return Topology(tp, pp, world // (tp * pp), rank)


def init_model_parallel(topo: Topology) -> None:
    """megatron-core's parallel_state for this topology (idempotent for the same sizes)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (topo.tp, topo.pp):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=topo.tp, pipeline_model_parallel_size=topo.pp)


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's parallel_state (tp > 1, no pipeline):
    DeepSpeed then averages gradients over the data-parallel group only and counts
    TP-replicated parameters once in the gradient norm."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()


__all__ = ["Topology", "topology", "init_model_parallel", "MegatronMPU"]
