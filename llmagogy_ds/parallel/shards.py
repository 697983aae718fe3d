"""Weights in and out of the ranks one tensor at a time: each rank reads only its own TP slices
of its pipeline stage's pieces from memory-mapped weights (``rundir.Weights``), and a finished
stage's fp32 weights and Adam moments leave the ranks as safetensors shards, tensor by tensor,
so that no process ever holds the whole model (``model_parallel`` knows the cut; this moves the
data across it)."""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.parallel import optim_state
from llmagogy_ds.parallel.model_parallel import local_names
from llmagogy_ds.parallel.tensor_parallel import piece_partition_dims, shard_state_dict
from llmagogy_ds.parallel.topology import Topology


def load_pieces(module, pieces: dict[str, torch.Tensor], layout, topo: Topology) -> list[str]:
    """Copy this rank's TP slices of the full ``pieces`` it holds into ``module``; returns their names."""
    own = local_names(module, layout)
    mine = shard_state_dict({c: t for c, t in pieces.items() if c in own}, layout, topo.tp, topo.tp_rank)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for c, t in mine.items():
            params[own[c]].copy_(t)
    return list(mine)


def load_weights(module, weights: RD.Weights, layout, topo: Topology) -> None:
    """Load this rank's part of ``weights`` (full tensors under canonical names), reading only
    its TP slices of its pipeline stage's pieces from the memory map."""
    own = local_names(module, layout)
    missing = sorted(set(own) - set(weights.keys()))
    if missing:
        raise RD.RunDirError(f"{weights.path}: lacks {len(missing)} weights of this model ({missing[0]}, …)")
    dims = piece_partition_dims(layout)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for c, name in own.items():
            params[name].copy_(weights.slice(c, dims[c], topo.tp, topo.tp_rank))


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def _merged(t: torch.Tensor, dim: int | None, topo: Topology) -> torch.Tensor:
    """The full fp32 tensor on the CPU from every TP rank's slice (collective over the TP group,
    on the slices' own device: NCCL moves no CPU tensors)."""
    if topo.tp > 1 and dim is not None:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(topo.tp)]
        dist.all_gather(parts, t, group=_tp_group())
        t = torch.cat(parts, dim=dim)
    return t.detach().float().cpu()


def write_final(engine, layout, topo: Topology, weights_dir, moments_dir) -> None:
    """Collective: the stage's final fp32 weights (DeepSpeed's fp32 master copy where there is one)
    and Adam moments into ``weights_dir`` and ``moments_dir`` as safetensors shards. Parameter by
    parameter: ZeRO partitions are joined by DeepSpeed's tensor-fragment API, TP slices by an
    all-gather in the TP group, and data-parallel replica 0 of each pipeline stage writes (TP rank
    0), holding at most one shard file. Frozen parameters have no optimizer state: their module
    value is the stage's init. Rank 0 indexes both folders afterwards (``finish_final``)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.zero_optimization_stage()
    writes = topo.dp_rank == 0 and topo.tp_rank == 0
    who = f"{topo.pp_rank:03d}"
    w = RD.ShardWriter(weights_dir, who) if writes else None
    m = RD.ShardWriter(moments_dir, who) if writes else None
    optim_state.link_state(engine)
    base = optim_state.base_optimizer(engine)
    params = dict(engine.module.named_parameters())
    dims = piece_partition_dims(layout)
    for c, name in local_names(engine.module, layout).items():
        p = params[name]
        if p.requires_grad and zero > 0:
            value = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in optim_state.KEYS}
        else:
            with deepspeed.zero.GatheredParameters([p], enabled=zero == 3):
                value = p.detach().clone()
            st = base.state.get(p, {}) if p.requires_grad else {}
            moments = {k: st.get(k) for k in optim_state.KEYS}
        value = _merged(value, dims[c], topo)
        if writes:
            w.add(c, value)
        if all(v is not None for v in moments.values()):  # the same on every rank of a TP group
            for k, v in moments.items():
                v = _merged(v, dims[c], topo)
                if writes:
                    m.add(f"{c}.{k}", v)
    if writes:
        w.close()
        m.close()


__all__ = ["load_pieces", "load_weights", "write_final"]
