"""Train one stage with DeepSpeed: ``python -m llmagogy_ds.train --run-dir RUN --stage NAME``.

Started by torchrun / the deepspeed launcher / srun, one process per rank. Rank 0 prepares
the stage (tokenizer, data, grown init) if needed; then every rank builds the model of the
stage's layout, loads ``init.pt``, puts each generation into its own param group(s) and
trains with ZeRO. It resumes from the latest complete checkpoint of the stage (model,
optimizer, scheduler, sampler position, counters, RNG states), so re-running is safe.

The loop itself is short (``run_steps``); side work is done by hooks (``hooks.py``), resume
and saving by the stage's checkpoints (``checkpoint.StageCheckpoints``), the stage's end by
``stage_end.finish_stage``.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig, parallel_limits
from llmagogy_ds.data.corpus import BlendedSampler, StageData, file_sha, heldout_windows, load_tokenizer
from llmagogy_ds.data.prepare import comparison_windows, stage_data
from llmagogy_ds.model.flops import flops_per_token
from llmagogy_ds.model.generations import DriftBudget, GenerationLR, param_groups
from llmagogy_ds.model.layout import ModelLayout, n_params, param_generations
from llmagogy_ds.model.stages import Plan
from llmagogy_ds.parallel import model_parallel as MP
from llmagogy_ds.parallel.engine import initialize
from llmagogy_ds.parallel.rendezvous import init_distributed
from llmagogy_ds.parallel.tensor_parallel import check_divisible, universal_checkpoint_info
from llmagogy_ds.parallel.topology import MegatronMPU, Topology, topology
from llmagogy_ds.train import checkpoint as C
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
    init_weights: dict
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
    state: dict = field(default_factory=lambda: {"step": 0, "samples": 0, "tokens": 0, "flops": 0.0, "wall": 0.0})
    budget: DriftBudget | None = None
    resumed: C.StageCheckpoints | None = None  # set when this run resumed from a checkpoint
    last_loss: torch.Tensor | None = None  # sum of the last step's micro-batch losses (this rank)
    final_loss: float | None = None
    stopped: bool = False

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
        """Training FLOPs per token of this stage's model."""
        return flops_per_token(self.layout, self.stage.model.seq_len)

    def heldout_loss(self, windows) -> float:
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


def setup_stage(run_dir: Path, stage_name: str, zero_stage: int | None = None, tp: int | None = None,
                pp: int | None = None) -> StageRun | dict | None:
    """Prepare (rank 0), build the model in this layout from ``init.pt``, decide the resume path.
    A stage already done returns its result (rank 0) or None."""
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
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
    dist.barrier()

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
    model = MP.build_model(layout, stage.model, topo)
    init_weights = torch.load(sdir / RD.INIT, map_location="cpu", weights_only=True)
    MP.load_full(model, init_weights, layout, topo)
    gen_of = param_generations(layout)
    mults = effective_multipliers(plan, run_dir, s)
    local_gen = {name: gen_of[c] for c, name in MP.local_names(model, layout).items()}
    groups = param_groups(model, local_gen, mults, train.weight_decay)
    n_total = n_params(layout)
    n_trainable = sum(v.numel() for k, v in init_weights.items() if mults[gen_of[k]] > 0)
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
                               C.estimate_bytes(n_total, n_trainable))
    C.mark_universal(model, universal_checkpoint_info(layout, {k for k, v in local_gen.items() if mults[v] > 0})
                     if topo.tp > 1 else None)
    run = StageRun(cfg, Path(run_dir), s, sdir, rank, world, topo, train, plan, layout, tok, data, sampler,
                   init_weights, mults, n_total, n_trainable, total_steps, layout_key, ckpts)

    def make_sched(opt):
        return GenerationLR(opt, train.lr, total_steps, train.warmup_steps, train.schedule, train.min_lr_ratio)

    run.engine, _, run.sched = initialize(model, groups, train, make_sched, load_universal=ckpts.universal,
                                          mpu=MegatronMPU() if topo.tp > 1 and topo.pp == 1 else None)
    return run


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
    run.logger = MetricsLogger(run.sdir, rank, run.cfg.wandb, run.cfg.run.name, stage.name, run.total_steps,
                               run.state["step"],
                               config={"stage": stage.name, "model": asdict(stage.model), "train": asdict(train),
                                       "multipliers": run.mults, "n_params": run.n_total,
                                       "n_trainable": run.n_trainable})
    hooks = [MetricsHook(), EvalHook(train.eval_every)]
    if stage.freeze.auto and run.s > 0:
        hooks.append(DriftBudgetHook(run, train.eval_every))
    hooks.append(CheckpointHook(train.checkpoint_every, stop_after))
    if not run_steps(run, hooks):
        return None

    moments = MP.gather_moments(run.engine, run.layout, topo)  # collective; the next stage may carry them
    # the full weights: gathered from the TP/PP ranks here, else from the checkpoint by rank 0
    weights = MP.gather_full(MP.local_tensors(run.engine.module, run.layout), run.layout, topo) \
        if topo.model_parallel else None
    result = None
    if rank == 0:
        RD.write_atomic(run.sdir / RD.MOMENTS, moments)
        result = finish_stage(run, weights)
        end = {f"drift_gen{g['generation']}": g["drift"] for g in result["generations"][:-1]}
        end.update({f"exam/{k}": v for k, v in result["exams_all_stages"].items()})
        run.logger.log(end, run.state["step"])
        run.logger.summary({**end, "loss_end": run.final_loss, "loss_after_growth": result["loss_after_growth"]})
    run.logger.close()
    dist.barrier()
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
