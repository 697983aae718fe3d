"""The model on a tp × pp × dp topology: build it, load full weights into it, gather them back.

Everything outside a training run (growth, evaluation, drift, checkpoint conversion) works on
the *full* (unsharded) state dict under the layout's names; these functions are the only
place that knows how a layout is cut into TP slices and pipeline stages.
"""
from __future__ import annotations

import math

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from llmagogy_ds.evaluation.evaluate import heldout_loss as dense_heldout_loss
from llmagogy_ds.model.gpt import GPT
from llmagogy_ds.model.layout import param_generations
from llmagogy_ds.parallel import optim_state
from llmagogy_ds.parallel.pipeline import canonical_name, canonical_state, pipeline_module
from llmagogy_ds.parallel.recompute import block_runner
from llmagogy_ds.parallel.tensor_parallel import merge_shards, ops_for, piece_partition_dims, shard_state_dict
from llmagogy_ds.parallel.topology import Topology, init_model_parallel


def build_model(layout, model_cfg, topo: Topology, recompute: int = 0):
    """The plain model (pp = 1, possibly tensor-parallel) or this rank's pipeline stage;
    ``recompute``: activation checkpointing's blocks per group (0: none; ``parallel/recompute.py``)."""
    if topo.model_parallel:
        init_model_parallel(topo)
    if topo.pp == 1:
        return GPT(layout, model_cfg.seq_len, model_cfg.rope_theta, model_cfg.norm_eps,
                   ops=ops_for(topo.tp), block_runner=block_runner(recompute))
    return pipeline_module(layout, model_cfg, topo.tp, topo, recompute)


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
        params = dict(module.named_parameters())
        return {c: params[n].grad.detach().clone() if params[n].grad is not None else torch.zeros_like(params[n])
                for c, n in local_names(module, layout).items()}
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


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def _counted_here(layout, topo: Topology) -> set[str]:
    """Canonical names this rank counts in a sum over the whole model: TP-replicated gains
    on tp rank 0 only, and data-parallel replica 0 only."""
    if topo.dp_rank != 0:
        return set()
    return {k for k, d in piece_partition_dims(layout).items() if d is not None or topo.tp_rank == 0}


@torch.no_grad()
def heldout_loss(engine, windows, micro_batch: int, topo: Topology) -> float:
    """Mean next-token loss over the held-out windows, split over the data-parallel ranks
    (TP and pipeline peers see the same windows). Collective."""
    if not is_pipeline(engine):
        return dense_heldout_loss(engine.module, windows, micro_batch, engine.device, part=(topo.dp_rank, topo.dp))
    # the pipeline schedule runs whole micro-batches, the same number on every replica: pad
    # with ignored targets, and sum (loss, count) so the padding weighs nothing
    per_replica = -(-len(windows) // topo.dp)
    n_micro = max(1, -(-per_replica // micro_batch))
    mine = windows[topo.dp_rank::topo.dp]
    x = np.zeros((n_micro * micro_batch, windows.shape[1]), dtype=np.int64)
    x[: len(mine)] = mine
    y = x[:, 1:].copy()
    y[len(mine):] = -100
    xt, yt = torch.from_numpy(x[:, :-1]).to(engine.device), torch.from_numpy(y).to(engine.device)
    batches = iter([(xt[i: i + micro_batch], yt[i: i + micro_batch]) for i in range(0, len(xt), micro_batch)])
    loss_fn = engine.module.pipe_loss
    loss_fn.sums = True
    engine.total_loss = None  # the engine adds eval losses onto the last training loss otherwise
    try:
        outs = engine.eval_batch(batches, reduce_output=None, bcast_loss=False, num_micro_batches=n_micro)
    finally:
        loss_fn.sums = False
        engine.total_loss = None
        engine.module.train()
    total = torch.zeros(2, dtype=torch.float64)
    if engine.is_last_stage() and topo.tp_rank == 0:
        total += sum(o.detach().double().cpu() for o in outs)
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else math.nan


def _live_drift_here(module: torch.nn.Module, start: dict[str, torch.Tensor], generation_of: dict[str, int],
               generations: list[int], zero3: bool = False, all_reduce: bool = False) -> dict[int, dict[str, float]]:
    """Drift of ``generations`` of this rank's live (possibly ZeRO-3 partitioned) model since ``start``.

    Collective under ZeRO-3 (each parameter is gathered in turn); every rank gets the result.
    Parameters absent from ``generation_of`` are not counted; ``all_reduce`` sums the counts of
    every rank (a model cut into TP slices / pipeline stages).
    """
    num = {g: 0.0 for g in generations}
    den = {g: 0.0 for g in generations}
    for name, p in module.named_parameters():
        g = generation_of.get(name)
        if g not in num:
            continue
        with deepspeed.zero.GatheredParameters([p], enabled=zero3):
            a, b = start[name].double(), p.detach().double().cpu()
            num[g] += float((b - a).pow(2).sum())
            den[g] += float(a.pow(2).sum())
    if all_reduce:
        t = torch.tensor([num[g] for g in generations] + [den[g] for g in generations], dtype=torch.float64)
        dist.all_reduce(t)
        num = dict(zip(generations, t[: len(generations)].tolist()))
        den = dict(zip(generations, t[len(generations):].tolist()))
    out = {}
    for g in generations:
        sq = num[g] / den[g] if den[g] else 0.0
        out[g] = {"drift": math.sqrt(sq), "drift_sq": sq}
    return out


def live_drift(module, start_full: dict[str, torch.Tensor], layout, topo: Topology, generations: list[int],
               zero3: bool = False) -> dict[int, dict[str, float]]:
    """Drift of ``generations`` of a live model (ZeRO-3 partitioned, cut into TP slices /
    pipeline stages or whole) since ``start_full``. Collective; every rank gets the result."""
    plain = _live_drift_here
    gen_of = param_generations(layout)
    if not topo.model_parallel:
        return plain(module, start_full, gen_of, generations, zero3)
    counted = _counted_here(layout, topo)
    names = {c: n for c, n in local_names(module, layout).items() if c in counted}
    start = shard_state_dict({c: start_full[c] for c in names}, layout, topo.tp, topo.tp_rank)
    return plain(module, {names[c]: v for c, v in start.items()}, {n: gen_of[c] for c, n in names.items()},
                 generations, zero3, all_reduce=True)


def gather_moments(engine, layout, topo: Topology) -> dict:
    """Full Adam moments under canonical names (rank 0 only when model-parallel). Collective."""
    KEYS = optim_state.KEYS
    local = optim_state.gather_moments(engine)
    if not topo.model_parallel:
        return local
    n = pipe_layers(engine.module, layout)
    canon = {(k if n is None else canonical_name(k, n)): v for k, v in local["moments"].items()}
    full = {key: gather_full({c: m[key] for c, m in canon.items()}, layout, topo) for key in KEYS}
    if dist.get_rank() != 0:
        return {"moments": {}, "steps": local["steps"]}
    return {"moments": {c: {key: full[key][c] for key in KEYS} for c in full[KEYS[0]]}, "steps": local["steps"]}


def localize_moments(grown: dict, module, layout, topo: Topology) -> dict:
    """Full grown moments → this rank's TP slices under its module's names."""
    own = local_names(module, layout)
    out = {}
    for c, m in grown["moments"].items():
        if c in own:
            out[own[c]] = {k: shard_state_dict({c: v}, layout, topo.tp, topo.tp_rank)[c] for k, v in m.items()}
    return {"moments": out, "steps": grown["steps"]}


__all__ = ["build_model", "load_full", "local_tensors", "gather_full", "local_names", "pipe_layers",
           "is_pipeline", "heldout_loss", "live_drift", "gather_moments", "localize_moments"]
