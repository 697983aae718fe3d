"""The model on a tp × pp × dp topology: build it, load full weights into it, gather them back.

Everything outside a training run (growth, evaluation, drift, checkpoint conversion) works on
the *full* (unsharded) state dict under the layout's names; these functions are the only
place that knows how a layout is cut into TP slices and pipeline stages.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model import GPT
from .pipeline import canonical_name, canonical_state, pipe_name, pipeline_module
from .tensor_parallel import merge_shards, shard_state_dict
from .topology import Topology, init_model_parallel


def build_model(layout, model_cfg, topo: Topology):
    """The plain model (pp = 1, possibly tensor-parallel) or this rank's pipeline stage."""
    if topo.model_parallel:
        init_model_parallel(topo)
    if topo.pp == 1:
        return GPT(layout, model_cfg.seq_len, model_cfg.rope_theta, model_cfg.norm_eps, tp=topo.tp)
    return pipeline_module(layout, model_cfg, topo.tp, topo)


def pipe_layers(module, layout) -> int | None:
    """``n_layers`` for name mapping when ``module`` is a pipeline, else None."""
    return None if isinstance(module, GPT) else layout.n_layers


def local_names(module, layout) -> dict[str, str]:
    """Canonical name → this module's parameter name, for the parameters this rank holds."""
    n = pipe_layers(module, layout)
    names = [k for k, _ in module.named_parameters()]
    return {k if n is None else canonical_name(k, n): k for k in names}


def load_full(module, full: dict[str, torch.Tensor], layout, topo: Topology) -> None:
    """Load this rank's TP slice of the pieces its pipeline stage holds."""
    own = local_names(module, layout)
    mine = shard_state_dict({k: full[k] for k in own}, layout, topo.tp, topo.tp_rank)
    missing = set(full) - set(own) if topo.pp == 1 else set()
    if missing:
        raise KeyError(f"the model has no parameters {sorted(missing)[:4]}…")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, name in own.items():
            params[name].copy_(mine[k])


def local_tensors(module, layout, grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's parameters (or their gradients) under canonical names."""
    if grads:
        return {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for k, p in ((c, dict(module.named_parameters())[n]) for c, n in local_names(module, layout).items())}
    return {k: v.detach().clone() for k, v in canonical_state(module, pipe_layers(module, layout)).items()}


def gather_full(local: dict[str, torch.Tensor], layout, topo: Topology) -> dict[str, torch.Tensor] | None:
    """Full tensors on rank 0 (None elsewhere) from every rank's canonical TP slices.

    Collective. Data-parallel replicas hold the same values: only dp rank 0 contributes.
    """
    payload = {k: v.detach().float().cpu() for k, v in local.items()} if topo.dp_rank == 0 else None
    if not topo.model_parallel and topo.dp == 1:
        return payload
    got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((topo.tp_rank, topo.pp_rank, payload), got, dst=0)
    if dist.get_rank() != 0:
        return None
    by_tp: dict[int, dict[str, torch.Tensor]] = {}
    for tp_rank, _pp, part in got:
        if part is not None:
            by_tp.setdefault(tp_rank, {}).update(part)
    return merge_shards([by_tp[r] for r in range(topo.tp)], layout)


__all__ = ["build_model", "load_full", "local_tensors", "gather_full", "local_names", "pipe_layers", "pipe_name"]
