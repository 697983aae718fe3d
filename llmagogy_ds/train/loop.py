"""Train one stage with DeepSpeed: ``python -m llmagogy_ds.train --run-dir RUN --stage NAME``.

Started by torchrun / the deepspeed launcher / srun, one process per rank. Rank 0 prepares
the stage (tokenizer, data, ``growth.json``) if needed; then every rank builds its part of the
model of the stage's layout, loads (or grows: ``grow.py``) its part of the start weights
``init/``, puts each generation into its own param group(s) and trains with ZeRO. It resumes
from the latest complete checkpoint of the stage (model, optimizer, scheduler, sampler
position, counters, RNG states), so re-running is safe.

The loop itself is short (``run_steps``); side work is done by hooks (``hooks.py``), resume
and saving by the stage's checkpoints (``checkpoint.StageCheckpoints``), the stage's end by
``stage_end.finish_stage``.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig, parallel_limits
from llmagogy_ds.data.corpus import BlendedSampler, StageData, file_sha, heldout_windows, load_tokenizer
from llmagogy_ds.data.prepare import comparison_windows, read_exams, stage_data
from llmagogy_ds.model.flops import flops_per_token, forward_flops_per_token
from llmagogy_ds.model.generations import DriftBudget, GenerationLR, param_groups
from llmagogy_ds.model.layout import ModelLayout, n_params, param_generations, param_shapes
from llmagogy_ds.model.stages import Plan
from llmagogy_ds.parallel import model_parallel as MP
from llmagogy_ds.parallel.engine import initialize
from llmagogy_ds.parallel.optim_state import group_steps
from llmagogy_ds.parallel.rendezvous import init_distributed
from llmagogy_ds.parallel.shards import write_final as write_shards
from llmagogy_ds.parallel.tensor_parallel import check_divisible, universal_checkpoint_info
from llmagogy_ds.parallel.topology import MegatronMPU, Topology, topology
from llmagogy_ds.train import checkpoint as C
from llmagogy_ds.train import grow as G
from llmagogy_ds.train.hooks import CheckpointHook, DriftBudgetHook, EvalHook, Hook, MetricsHook
from llmagogy_ds.train.metrics import MetricsLogger
from llmagogy_ds.train.prepare import effective_multipliers, prepare_stage
from llmagogy_ds.train.stage_end import finish_stage
from llmagogy_ds.train.step import elastic_split, train_step


@dataclass
class StageRun:
    """Everything one rank knows about the stage it trains; the hooks read and update it."""

    cfg: CurriculumConfig
    run_dir: Path
    s: int
    sdir: Path
    rank: int
    world: int
    topo: Topology
    train: object  # the stage's TrainConfig, split over this world size
    plan: Plan
    layout: ModelLayout
    tok: object
    data: StageData
    sampler: BlendedSampler
    init_weights: RD.Weights  # the stage's start weights, memory-mapped (read by name)
    mults: dict[int, float]  # lr multipliers at the stage's start
    n_total: int
    n_trainable: int
    total_steps: int
    layout_key: dict
    checkpoints: C.StageCheckpoints
    engine: object = None
    sched: GenerationLR | None = None
    logger: MetricsLogger | None = None
    windows: object = None  # held-out windows
    compare: dict = field(default_factory=dict)  # a baseline run: every curriculum stage's held-out set
    state: dict = field(default_factory=lambda: {"step": 0, "samples": 0, "tokens": 0, "flops": 0.0, "wall": 0.0,
                                                 "eval_flops": 0.0})
    budget: DriftBudget | None = None
    resumed: C.StageCheckpoints | None = None  # set when this run resumed from a checkpoint
    last_loss: torch.Tensor | None = None  # sum of the last step's micro-batch losses (this rank)
    final_loss: float | None = None
    stopped: bool = False
    host_mem: tuple = (0, 0)  # this rank's peak host memory (bytes): the process alone, with its weights

    @property
    def stage(self):
        return self.cfg.stages[self.s]

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch * self.train.grad_accum * self.topo.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.stage.model.seq_len

    @cached_property
    def fpt(self) -> float:
        """Training FLOPs per token of this stage's model (frozen generations: 4·N, ``model/flops.py``)."""
        return flops_per_token(self.layout, self.stage.model.seq_len, self.mults)

    def heldout_loss(self, windows) -> float:
        """Held-out loss; its forward FLOPs go to ``state["eval_flops"]``, apart from training's."""
        seq = self.stage.model.seq_len
        self.state["eval_flops"] = self.state.get("eval_flops", 0.0) + \
            forward_flops_per_token(self.layout, seq) * len(windows) * seq
        return MP.heldout_loss(self.engine, windows, self.train.micro_batch, self.topo)


def run_steps(run: StageRun, hooks: list[Hook]) -> bool:
    """Train to the stage's last step; False when a hook stopped the run before it."""
    for h in hooks:
        h.on_start(run)
    run.engine.train()
    state, train = run.state, run.train
    while state["step"] < run.total_steps:
        t0 = time.time()
        for h in hooks:
            h.before_step(run)
        run.last_loss = train_step(run.engine, run.sampler, state["samples"], train.micro_batch, train.grad_accum,
                                   run.topo.dp_rank, run.topo.dp)
        state["step"] += 1
        state["samples"] += run.global_batch
        state["tokens"] += run.tokens_per_step
        state["flops"] += run.fpt * run.tokens_per_step
        state["wall"] += time.time() - t0
        for h in hooks:
            h.after_step(run)
        if run.stopped:
            return False
    for h in reversed(hooks):
        h.on_end(run)
    return True


_RANK0_WAITS = []


def rank0_waits():
    """A gloo group of all ranks for waiting on rank 0's long work alone (preparing data; the stage
    end's exams, evaluation and export): its timeout (a day) is for that work, not the collective
    timeout meant to catch a hung rank. A failing rank 0 still ends the job (torchrun, srun)."""
    if not _RANK0_WAITS or _RANK0_WAITS[0][0] is not dist.group.WORLD:  # one per process group
        _RANK0_WAITS[:] = [(dist.group.WORLD, dist.new_group(backend="gloo", timeout=timedelta(days=1)))]
    return _RANK0_WAITS[0][1]


def wait_for_rank0() -> None:
    dist.barrier(group=rank0_waits())


def setup_stage(run_dir: Path, stage_name: str, zero_stage: int | None = None, tp: int | None = None,
                pp: int | None = None) -> StageRun | dict | None:
    """Prepare (rank 0), build this rank's part of the model in this layout from ``init/`` (grown
    here first when it is not there), decide the resume path.
    A stage already done returns its result (rank 0) or None."""
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    rank0_waits()  # made while every rank is here
    cfg = RD.load_run_config(run_dir)
    s = cfg.stage_index(stage_name)
    stage, train = cfg.stages[s], cfg.stages[s].train
    topo = topology(train.tp if tp is None else tp, train.pp if pp is None else pp)
    sdir = RD.stage_dir(run_dir, cfg, s)
    if (sdir / RD.RESULT).exists():
        return RD.read_json(sdir / RD.RESULT) if rank == 0 else None
    if world != train.nproc and rank == 0:
        print(f"[llmagogy] stage {stage.name}: config nproc={train.nproc}, running on {world} processes")
    if rank == 0:
        prepare_stage(cfg, run_dir, s)
    wait_for_rank0()

    torch.manual_seed(cfg.run.seed + s)
    tok = load_tokenizer(RD.tokenizer_path(run_dir))
    data = stage_data(cfg, run_dir, s, tok, file_sha(RD.tokenizer_path(run_dir)))
    plan = RD.run_plan(run_dir, cfg, tok.get_vocab_size())  # with the run's RMSNorm epsilon rule
    layout = plan.layout(s)
    zs = train.zero_stage if zero_stage is None else zero_stage
    errs = check_divisible(layout, topo.tp) + parallel_limits(topo.tp, topo.pp, zs)
    if errs:
        raise ValueError(f"stage {stage.name}: cannot run with tp={topo.tp}, pp={topo.pp}, ZeRO {zs}: "
                         + "; ".join(errs))
    base_mem = G.process_base(topo)  # the process before any model: libraries, data, parallel state
    fresh = s > 0 and "loss_prev_model" not in (RD.read_json(sdir / RD.GROWTH) or {})
    if fresh:  # the previous model's held-out loss, by all ranks, before the grown model takes the memory
        windows = heldout_windows(data, stage.model.seq_len, train.eval_tokens)
        G.check_prev_model(cfg, run_dir, s, plan, topo, windows, read_exams(data), tok, train.micro_batch)
    model = MP.build_model(layout, stage.model, topo, recompute=train.recompute_interval)
    # this rank's part only: read from init/, or grown here from the previous weights (memory-mapped)
    init_weights = G.start_weights(model, cfg, run_dir, plan, s, topo)
    gen_of = param_generations(layout)
    mults = effective_multipliers(plan, run_dir, s)
    local_gen = {name: gen_of[c] for c, name in MP.local_names(model, layout).items()}
    groups = param_groups(model, local_gen, mults, train.weight_decay)
    n_total = n_params(layout)
    n_trainable = sum(math.prod(v) for k, v in param_shapes(layout).items() if mults[gen_of[k]] > 0)
    # the global batch is the config's; another world size (a restart on other nodes, or --tp/--pp) changes
    # only how it is split, so the data order and the steps stay those of the config
    train = elastic_split(train, topo.dp, zero_stage)
    seq = stage.model.seq_len
    sampler = BlendedSampler(data, seq, cfg.run.seed + 17 * s)
    # the config's global batch (= this split's): the same steps on any world size
    total_steps = stage.train.steps_for(seq, sum(w * seq for w in sampler.windows))
    layout_key = {"tp": topo.tp, "pp": topo.pp}
    # rank 0 checks the checkpoints (a bad one is set aside), picks one and converts it if the
    # layout changed; every rank resumes from its pick
    ckpts = C.StageCheckpoints(sdir, world, train.zero_stage, layout_key, train.keep_checkpoints,
                               C.estimate_bytes(n_total, n_trainable),
                               carry=lambda module: G.carried_moments(module, cfg, run_dir, plan, s))
    C.mark_universal(model, universal_checkpoint_info(layout, {k for k, v in local_gen.items() if mults[v] > 0})
                     if topo.tp > 1 else None)
    run = StageRun(cfg, Path(run_dir), s, sdir, rank, world, topo, train, plan, layout, tok, data, sampler,
                   init_weights, mults, n_total, n_trainable, total_steps, layout_key, ckpts)

    def make_sched(opt):
        return GenerationLR(opt, train.lr, total_steps, train.warmup_steps, train.schedule, train.min_lr_ratio)

    run.host_mem = (base_mem, G.host_peak())  # the weights are in place; DeepSpeed's optimizer state is next
    run.engine, _, run.sched = initialize(model, groups, train, make_sched, load_universal=ckpts.universal,
                                          mpu=MegatronMPU() if topo.tp > 1 and topo.pp == 1 else None)
    return run


def write_final(run: StageRun) -> None:
    """The stage's final weights (``model/``) and Adam moments (``moments/``, the next stage may
    carry them) as safetensors shards, written by the ranks that hold them; rank 0 indexes them."""
    weights, moments = run.sdir / RD.MODEL_DIR, run.sdir / RD.MOMENTS_DIR
    if run.rank == 0:
        RD.begin_store(weights)
        RD.begin_store(moments)
    dist.barrier()
    write_shards(run.engine, run.layout, run.topo, weights, moments)
    steps = group_steps(run.engine)
    dist.barrier()
    if run.rank == 0:
        RD.finish_store(moments, metadata={"steps": steps})
        RD.finish_store(weights, param_shapes(run.layout))  # last: the stage's weights are complete


def train_stage(run_dir: Path, stage_name: str, stop_after: int | None = None, zero_stage: int | None = None,
                tp: int | None = None, pp: int | None = None) -> dict | None:
    """Train (or resume) one stage; returns the stage result on rank 0 when it finished.

    ``zero_stage``, ``tp`` and ``pp`` override the stage's config (a restart in another layout).
    """
    run = setup_stage(run_dir, stage_name, zero_stage, tp, pp)
    if not isinstance(run, StageRun):
        return run
    rank, stage, topo, train = run.rank, run.stage, run.topo, run.train
    counters = run.checkpoints.resume(run.engine, run.sched, run.layout, topo, rank, stage.name)
    if counters is not None:
        run.state.update(counters)
        run.resumed = run.checkpoints
        if rank == 0:
            how = (f" in another layout (tp={topo.tp}, pp={topo.pp}, dp={topo.dp}; "
                   if run.checkpoints.relayout else " (")
            print(f"[llmagogy] stage {stage.name}: resumed from {run.checkpoints.tag}{how}"
                  f"step {run.state['step']}/{run.total_steps})")
    run.windows = heldout_windows(run.data, stage.model.seq_len, train.eval_tokens)
    run.compare = comparison_windows(run.run_dir, run.tok)
    if counters is None and run.s > 0 and "loss_after_growth" not in (RD.read_json(run.sdir / RD.GROWTH) or {}):
        G.check_grown_model(run, read_exams(run.data))  # the grown model in this layout, by all ranks
    if counters is None:  # per-rank peak host memory at the stage's start: its own shard + the process
        mem = G.host_memory(*run.host_mem)
    run.logger = MetricsLogger(run.sdir, rank, run.cfg.wandb, run.cfg.run.name, stage.name, run.total_steps,
                               run.state["step"],
                               config={"stage": stage.name, "model": asdict(stage.model), "train": asdict(train),
                                       "multipliers": run.mults, "n_params": run.n_total,
                                       "n_trainable": run.n_trainable})
    if counters is None:
        run.logger.log({"event": "host_memory", **mem}, 0)
    hooks = [MetricsHook(), EvalHook(train.eval_every)]
    if stage.freeze.auto and run.s > 0:
        hooks.append(DriftBudgetHook(run, train.eval_every))
    hooks.append(CheckpointHook(train.checkpoint_every, stop_after))
    if not run_steps(run, hooks):
        return None

    write_final(run)  # collective: fp32 weights and Adam moments as shards, one tensor at a time
    result = None
    if rank == 0:
        result = finish_stage(run)
        end = {f"drift_gen{g['generation']}": g["drift"] for g in result["generations"][:-1]}
        end.update({f"exam/{k}": v for k, v in result["exams_all_stages"].items()})
        run.logger.log(end, run.state["step"])
        run.logger.summary({**end, "loss_end": run.final_loss, "loss_after_growth": result["loss_after_growth"]})
    run.logger.close()
    wait_for_rank0()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--stage", required=True)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="checkpoint and exit after this many steps (tests; a scheduler's time limit)")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                    help="resume this stage under another ZeRO stage than its config's (elastic restart)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("--tp", type=int, default=None,
                    help="resume this stage with another tensor-parallel size than its config's")
    ap.add_argument("--pp", type=int, default=None,
                    help="resume this stage with another pipeline-parallel size than its config's")
    args = ap.parse_args(argv)
    try:
        train_stage(args.run_dir, args.stage, args.stop_after, args.zero_stage, args.tp, args.pp)
    except BaseException as e:
        # name the rank: with many ranks the first failing one is the one to read
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
            host = socket.gethostname()
            print(f"[llmagogy] rank {rank} on {host} failed in stage {args.stage}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        raise
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing down its group while a peer still works aborts it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
