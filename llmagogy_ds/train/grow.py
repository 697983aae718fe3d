"""Growth where the model lives: every rank grows its own part of the stage's model (its TP
slices of its pipeline stage's pieces) from the previous stage's weights, read by memory map one
tensor at a time, and the function-preservation check runs on all ranks, data-parallel: the
previous model in its own layout (``loss_prev_model``), the grown one in the stage's layout
(``loss_after_growth``, after the engine is built). Nothing here holds a whole model, and no rank
does long work while the others wait in a collective.

What is done is kept, so a requeue never repeats it: the grown weights (``init/``, written by
one rank per pipeline stage as it grows them), and each measurement in ``growth.json``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.evaluation.evaluate import exam_accuracy, heldout_loss
from llmagogy_ds.model.growth import grow_moments, grow_state_dict
from llmagogy_ds.model.layout import param_shapes, weight_specs
from llmagogy_ds.parallel.model_parallel import local_names
from llmagogy_ds.parallel.shards import load_pieces, load_weights
from llmagogy_ds.parallel.tensor_parallel import check_divisible, ops_for, piece_partition_dims
from llmagogy_ds.parallel.topology import Topology, init_model_parallel
from llmagogy_ds.train.checkpoint import _broadcast as broadcast
from llmagogy_ds.train.prepare import prev_weights


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def record(sdir: Path, values: dict) -> None:
    """Rank 0 adds ``values`` to ``growth.json``."""
    if dist.get_rank() == 0:
        RD.write_atomic(sdir / RD.GROWTH, {**(RD.read_json(sdir / RD.GROWTH) or {}), **values})


def check_prev_model(cfg, run_dir: Path, s: int, plan, topo: Topology, windows, exams: list[dict], tok,
                     micro_batch: int) -> None:
    """``loss_prev_model`` (and ``exam_prev_model``) on all ranks: the previous model in its own
    layout, TP-sliced like this stage where it divides (else whole), each rank reading only its
    slices; the held-out windows split over the replicas. Freed before the grown model is built."""
    prev_layout = plan.layout(s - 1)
    tp = topo.tp if not check_divisible(prev_layout, topo.tp) else 1
    if topo.model_parallel:
        init_model_parallel(topo)
    model = plan.model(s - 1, ops=ops_for(tp) if tp > 1 else None)
    weights = RD.Weights(prev_weights(cfg, run_dir, s))
    dims = piece_partition_dims(prev_layout)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(weights.slice(k, dims[k], tp, topo.tp_rank if tp > 1 else 0))
    del weights
    dev = device()
    model.to(dev)
    # TP peers see the same windows (their equal sums cancel in the mean); every other rank is a
    # replica with its own share. The sums travel as a tensor on the device (NCCL has no CPU tensors)
    i, n = ((topo.dp_rank + topo.dp * topo.pp_rank, topo.dp * topo.pp) if tp > 1
            else (dist.get_rank(), dist.get_world_size()))
    mine = windows[i::n]
    count = len(mine) * (windows.shape[1] - 1)
    loss = heldout_loss(model, mine, micro_batch, dev) if len(mine) else 0.0
    sums = torch.tensor([loss * count, count], dtype=torch.float64, device=dev)
    dist.all_reduce(sums)
    out = {"loss_prev_model": float(sums[0] / sums[1])}
    if exams and (tp == 1 or dev.type == "cuda"):  # every rank scores all items (TP peers run the same
        # forwards); megatron's logit gather of a TP model runs on CUDA only
        out["exam_prev_model"] = exam_accuracy(model, tok, exams, cfg.stages[s].model.seq_len, device=dev)
    record(RD.stage_dir(run_dir, cfg, s), out)


def check_grown_model(run, exams: list[dict]) -> None:
    """``loss_after_growth`` (and ``exam_after_growth``) of the grown model in the stage's layout,
    on all ranks; the same measurement as ``loss_at_start``, which it sets too."""
    loss = run.heldout_loss(run.windows)
    run.state["loss_at_start"] = loss
    out = {"loss_after_growth": loss}
    # a pipeline has no whole forward on one rank to score items with; a TP model's logits gather on CUDA only
    if exams and run.topo.pp == 1 and (run.topo.tp == 1 or torch.device(run.engine.device).type == "cuda"):
        out["exam_after_growth"] = exam_accuracy(run.engine.module, run.tok, exams, run.stage.model.seq_len,
                                                 device=run.engine.device)
    record(run.sdir, out)


def grow_local(module, cfg, run_dir: Path, plan, s: int, topo: Topology, store: Path) -> None:
    """Grow this rank's part of stage ``s``'s model into ``module``, weight by weight, from the
    previous stage's memory-mapped weights. TP peers compute the same full weight (its generator
    depends on the seed and its name only) and keep their slices; data-parallel replica 0's TP
    rank 0 of each pipeline stage writes it into ``store`` (the stage's ``init/``)."""
    stage = cfg.stages[s]
    layout = plan.layout(s)
    prev = RD.Weights(prev_weights(cfg, run_dir, s))
    own = set(local_names(module, layout))
    writer = RD.ShardWriter(store, f"{topo.pp_rank:03d}") if topo.dp_rank == 0 and topo.tp_rank == 0 else None
    kw = dict(depth=stage.growth.depth, init=stage.growth.init, init_std=stage.model.init_std,
              seed=cfg.run.seed * 1000 + s)
    for spec in weight_specs(layout):
        if any(f"{spec.name}.{n}" in own for n, _, _ in spec.pieces()):
            pieces = grow_state_dict(prev, plan.layout(s - 1), layout, plan.layouts[s][1], only={spec.name}, **kw)
            load_pieces(module, pieces, layout, topo)
            for k, v in pieces.items() if writer else ():
                writer.add(k, v)
    if writer:
        writer.close()


def start_weights(module, cfg, run_dir: Path, plan, s: int, topo: Topology) -> RD.Weights:
    """Put this rank's part of the stage's start weights into ``module``: read from ``init/`` (an
    older run's ``init.pt``) when it is there, else grown here (and so written there). Collective.
    Returns the start weights, memory-mapped (drift and frozen pieces read them by name)."""
    sdir = RD.stage_dir(run_dir, cfg, s)
    found = RD.weights_at(sdir, RD.INIT_DIR)
    if found is not None:
        load_weights(module, RD.Weights(found), plan.layout(s), topo)
        return RD.Weights(found)
    store = sdir / RD.INIT_DIR
    if dist.get_rank() == 0:
        RD.begin_store(store)
    dist.barrier()
    grow_local(module, cfg, run_dir, plan, s, topo, store)
    dist.barrier()
    ok = 1
    if dist.get_rank() == 0:
        try:
            RD.finish_store(store, param_shapes(plan.layout(s)))
        except RD.RunDirError as e:
            print(f"[llmagogy] {e}", flush=True)
            ok = 0
    if not broadcast(ok):  # every rank learns it, so none waits for a rank that failed
        raise RD.RunDirError(f"{store}: the grown weights are incomplete (see rank 0's message)")
    return RD.Weights(store)


def host_peak() -> int:
    """This process's peak resident memory so far (bytes; ``VmHWM``), 0 where the OS does not say."""
    try:
        with open("/proc/self/status") as f:
            return next((int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def process_base(topo: Topology) -> int:
    """Peak host memory of the process before any model is built, with the model-parallel
    state (megatron-core) set up: what a rank costs besides its weights."""
    if topo.model_parallel:
        init_model_parallel(topo)
    return host_peak()


def host_memory(base: int, start: int) -> dict:
    """Every rank's peak host memory before the stage's model (``base``: the process itself) and
    when its weights are in place, before DeepSpeed's optimizer state (``start``). Collective."""
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, (base, start))
    return {"host_base_bytes": [b for b, _ in got], "host_start_bytes": [s for _, s in got]}


class Moments:
    """Adam moments by parameter name (``{"exp_avg": t, "exp_avg_sq": t}``) read by memory map from
    a moments folder (tensors ``<name>.exp_avg``, steps in the index's metadata) or an old moments.pt."""

    KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, path: Path):
        self.w = RD.Weights(path)
        if Path(path).is_dir():
            self.old, self.names = None, {k.rsplit(".", 1)[0] for k in self.w.keys()}
            self.steps = {int(g): n for g, n in (self.w.metadata.get("steps") or {}).items()}
        else:  # moments.pt: {"moments": {name: {key: tensor}}, "steps": {generation: n}}
            self.old = self.w.metadata.get("moments", {})
            self.names, self.steps = set(self.old), dict(self.w.metadata.get("steps", {}))

    def __contains__(self, name) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> dict:
        return self.old[name] if self.old is not None else {k: self.w[f"{name}.{k}"] for k in self.KEYS}


def carried_moments(module, cfg, run_dir: Path, plan, s: int) -> dict | None:
    """This rank's grown Adam moments (``growth.optimizer: carry``) under canonical names, from
    the previous stage's memory-mapped moments; None when there is nothing to carry."""
    stage = cfg.stages[s]
    found = RD.weights_at(RD.stage_dir(run_dir, cfg, s - 1), RD.MOMENTS_DIR) if s > 0 else None
    if found is None or stage.growth.optimizer != "carry":
        return None
    m = Moments(found)
    own = set(local_names(module, plan.layout(s)))
    grown = grow_moments(m, plan.layout(s - 1), plan.layout(s), plan.layouts[s][1], init=stage.growth.init, only=own)
    return {"moments": grown, "steps": m.steps}


__all__ = ["host_peak", "process_base", "host_memory", "check_prev_model", "check_grown_model", "grow_local",
           "start_weights", "carried_moments", "Moments"]
