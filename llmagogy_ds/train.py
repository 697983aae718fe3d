"""Train one stage with DeepSpeed: ``python -m llmagogy_ds.train --run-dir RUN --stage NAME``.

Started by torchrun / the deepspeed launcher / srun, one process per rank. Rank 0 prepares
the stage (tokenizer, data, grown init) if needed; then every rank builds the model of the
stage's layout, loads ``init.pt``, puts each generation into its own param group(s) and
trains with ZeRO. It resumes from the latest complete checkpoint of the stage (model,
optimizer, scheduler, sampler position, counters, RNG states), so re-running is safe.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as C
from . import curriculum as K
from .data import BlendedSampler, StageData, file_sha, heldout_windows, load_tokenizer
from .evaluate import exam_accuracy
from .flops import flops_per_token, mfu
from .generations import DriftBudget, GenerationLR, generation_drift, param_groups, schedule_factor
from .layout import n_params, param_generations
from .metrics import MetricsLogger
from .optim_state import group_meta, group_steps, restore_group_meta, restore_moments
from .parallel import model_parallel as MP
from .parallel.ds_engine import device_kind, init_distributed, initialize
from .parallel.tensor_parallel import check_divisible, universal_checkpoint_info
from .parallel.topology import MegatronMPU, topology


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class StopFlag:
    """Set by SIGUSR1/SIGTERM: finish the optimizer step, checkpoint, exit (preemption)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.requested = True

    def agreed(self) -> bool:
        """All ranks stop at the same step if any rank got the signal."""
        flag = torch.tensor([1 if self.requested else 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def elastic_split(train, world: int, zero_stage: int | None = None):
    """The stage's TrainConfig for ``world`` data-parallel ranks, same global batch.

    The global batch is micro_batch × grad_accum × (nproc / (tp·pp)) of the config. On another
    world size the gradient accumulation (else the micro batch) absorbs the difference.
    """
    from dataclasses import replace

    if zero_stage is not None:
        train = replace(train, zero_stage=zero_stage)
    cfg_dp = train.nproc // (train.tp * train.pp)
    if world == cfg_dp:
        return train
    global_batch = train.micro_batch * train.grad_accum * cfg_dp
    if global_batch % (train.micro_batch * world) == 0:
        return replace(train, grad_accum=global_batch // (train.micro_batch * world))
    if global_batch % world == 0:
        return replace(train, micro_batch=global_batch // world, grad_accum=1)
    raise ValueError(f"global batch {global_batch} sequences (train.micro_batch × grad_accum × nproc) cannot be "
                     f"split over {world} ranks; run on a world size that divides it")


def micro_batches(sampler: BlendedSampler, samples: int, micro_batch: int, grad_accum: int, rank: int, dp: int,
                  device):
    """This data-parallel rank's micro-batches of the global batch starting at ``samples``.

    Rank r takes samples ``r * micro_batch`` on of each micro-step's ``micro_batch * dp``, so
    the global batch is the same set of samples for any split into ranks × micro-steps.
    (TP and pipeline peers share a data-parallel rank, hence the same batches.)
    """
    for micro in range(grad_accum):
        x, y = sampler.batch(samples + micro * micro_batch * dp + rank * micro_batch, micro_batch)
        yield torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def train_step(engine, sampler: BlendedSampler, samples: int, micro_batch: int, grad_accum: int, rank: int,
               dp: int) -> torch.Tensor:
    """One optimizer step; returns the sum of the micro-batch losses."""
    batches = micro_batches(sampler, samples, micro_batch, grad_accum, rank, dp, engine.device)
    if MP.is_pipeline(engine):  # DeepSpeed's pipeline schedule runs every micro-batch
        return engine.train_batch(batches).detach().reshape(1) * grad_accum
    loss_acc = torch.zeros(1, device=engine.device)
    for x, y in batches:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        loss_acc += loss.detach()
    return loss_acc


def train_stage(run_dir: Path, stage_name: str, stop_after: int | None = None, zero_stage: int | None = None,
                tp: int | None = None, pp: int | None = None) -> dict | None:
    """Train (or resume) one stage; returns the stage result on rank 0 when it finished.

    ``zero_stage``, ``tp`` and ``pp`` override the stage's config (a restart in another layout).
    """
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = K.load_run_config(run_dir)
    s = cfg.stage_index(stage_name)
    stage, train = cfg.stages[s], cfg.stages[s].train
    topo = topology(train.tp if tp is None else tp, train.pp if pp is None else pp)
    sdir = K.stage_dir(run_dir, cfg, s)
    if (sdir / "result.json").exists():
        return json.loads((sdir / "result.json").read_text()) if rank == 0 else None
    if world != train.nproc and rank == 0:
        print(f"[llmagogy] stage {stage.name}: config nproc={train.nproc}, running on {world} processes")
    if rank == 0:
        K.prepare_stage(cfg, run_dir, s)
    dist.barrier()

    torch.manual_seed(cfg.run.seed + s)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    data = K.stage_data(cfg, run_dir, s, tok, file_sha(run_dir / "tokenizer.json"))
    plan = K.Plan(cfg, tok.get_vocab_size())
    layout = plan.layout(s)
    errs = check_divisible(layout, topo.tp)
    if errs:
        raise ValueError(f"stage {stage.name}: cannot run with tp={topo.tp}: " + "; ".join(errs))
    zs = train.zero_stage if zero_stage is None else zero_stage
    if topo.pp > 1 and zs > 1:
        raise ValueError(f"stage {stage.name}: pipeline parallel (pp={topo.pp}) needs ZeRO stage <= 1 "
                         f"(running with {zs}; pass --zero-stage 1)")
    if topo.tp > 1 and zs > 2:
        raise ValueError(f"stage {stage.name}: tensor parallel (tp={topo.tp}) needs ZeRO stage <= 2 (running with {zs})")
    model = MP.build_model(layout, stage.model, topo)
    init_weights = torch.load(sdir / "init.pt", map_location="cpu", weights_only=True)
    MP.load_full(model, init_weights, layout, topo)
    gen_of = param_generations(layout)
    mults = K.effective_multipliers(plan, run_dir, s)
    local_gen = {name: gen_of[c] for c, name in MP.local_names(model, layout).items()}
    groups = param_groups(model, local_gen, mults, train.weight_decay)
    n_total = n_params(layout)
    n_trainable = sum(v.numel() for k, v in init_weights.items() if mults[gen_of[k]] > 0)

    # the global batch is the config's; another world size (a restart on other nodes) changes
    # only how it is split, so the data order and the steps stay those of the config
    train = elastic_split(train, topo.dp, zero_stage)
    dp, dp_rank = topo.dp, topo.dp_rank
    global_batch = train.micro_batch * train.grad_accum * dp
    seq = stage.model.seq_len
    tokens_per_step = global_batch * seq
    sampler = BlendedSampler(data, seq, cfg.run.seed + 17 * s)
    # the config's global batch (= this split's): the same steps on any world size
    total_steps = stage.train.steps_for(seq, sum(w * seq for w in sampler.windows))

    def make_sched(opt):
        return GenerationLR(opt, train.lr, total_steps, train.warmup_steps, train.schedule, train.min_lr_ratio)

    ckpt_dir = sdir / "checkpoints"
    tag = C.latest_complete(ckpt_dir)
    layout_key = {"tp": topo.tp, "pp": topo.pp}
    # another tp/pp (either side model-parallel): through the universal (unsharded) form, loaded
    # per canonical parameter; another world size or ZeRO stage only: DeepSpeed's universal load
    relayout = tag is not None and C.needs_relayout(ckpt_dir, tag, world, train.zero_stage, layout_key)
    universal = not relayout and tag is not None and C.needs_universal(ckpt_dir, tag, world, train.zero_stage)
    if universal or relayout:
        if rank == 0:
            C.to_universal(ckpt_dir, tag)
        dist.barrier()
    C.mark_universal(model, universal_checkpoint_info(layout, {k for k, v in local_gen.items() if mults[v] > 0})
                     if topo.tp > 1 else None)
    engine, _, sched = initialize(model, groups, train, make_sched, load_universal=universal,
                                  mpu=MegatronMPU() if topo.tp > 1 and topo.pp == 1 else None)
    state = {"step": 0, "samples": 0, "tokens": 0, "flops": 0.0, "wall": 0.0}
    if relayout:
        client = C.load_relayout(engine, ckpt_dir, tag, layout, topo)
        sched.load_state_dict(client["lr_scheduler"])
        state.update(client["llmagogy"])
        if rank == 0:
            print(f"[llmagogy] stage {stage.name}: resumed from {tag} in another layout (tp={topo.tp}, "
                  f"pp={topo.pp}, dp={dp}; step {state['step']}/{total_steps})")
    elif tag is not None:
        load_tag = f"{tag}_universal" if universal else tag
        meta = group_meta(engine)
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if universal:
            restore_group_meta(engine, meta, client.get("adam_steps"))
            sched.apply()
        state.update(client["llmagogy"])
        rng = client.get("rng", {}).get(rank)
        if rng is not None:
            set_rng_state(rng)
        if rank == 0:
            print(f"[llmagogy] stage {stage.name}: resumed from {tag} (step {state['step']}/{total_steps})")
    elif (sdir / "init_moments.pt").exists():  # growth.optimizer: carry
        grown = torch.load(sdir / "init_moments.pt", map_location="cpu", weights_only=True)
        n = restore_moments(engine, MP.localize_moments(grown, engine.module, layout, topo))
        if rank == 0:
            print(f"[llmagogy] stage {stage.name}: Adam moments of {n} old tensors carried across growth")

    windows = heldout_windows(data, seq, train.eval_tokens)
    from .baseline import comparison_windows
    compare = comparison_windows(run_dir, tok)  # a baseline run: every curriculum stage's held-out set too
    fpt = flops_per_token(layout, seq)
    logger = MetricsLogger(sdir, rank, cfg.wandb, cfg.run.name, stage.name, total_steps, state["step"],
                           config={"stage": stage.name, "model": asdict(stage.model), "train": asdict(train),
                                   "multipliers": mults, "n_params": n_total, "n_trainable": n_trainable})
    if tag is not None:  # a check users see: the loss right after resume is the checkpoint's
        logger.log({"event": "resume", "from": tag, "world_size": world, "zero_stage": train.zero_stage,
                    "tp": topo.tp, "pp": topo.pp, "relayout": relayout,
                    "universal": universal,
                    "heldout_loss": MP.heldout_loss(engine, windows, train.micro_batch, topo)},
                   state["step"])
    elif s > 0:  # growth preserved the function in this stage's own layout (TP slices, pipeline)
        state["loss_at_start"] = MP.heldout_loss(engine, windows, train.micro_batch, topo)
        logger.log({"event": "start", "tp": topo.tp, "pp": topo.pp, "world_size": world,
                    "heldout_loss": state["loss_at_start"]}, 0)
    budget = None
    if stage.freeze.auto and s > 0:  # drift-budget F: lower old generations' lr to stay in budget
        olds = [g for g in range(s) if mults[g] > 0]
        budget = DriftBudget(stage.freeze.drift_budget, olds,
                             lambda t: schedule_factor(t, total_steps, train.warmup_steps, train.schedule,
                                                       train.min_lr_ratio), total_steps)
        if "drift_budget" in state:
            budget.load_state_dict(state["drift_budget"])
    stop = StopFlag()
    need_bytes = C.estimate_bytes(n_total, n_trainable)

    def save():
        if budget is not None:
            state["drift_budget"] = budget.state_dict()
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
        C.save(engine, ckpt_dir, state["step"], {"llmagogy": dict(state), "rng": dict(enumerate(rngs)),
                                                 "adam_steps": group_steps(engine)},
               train.keep_checkpoints, need_bytes, layout_key)

    def evaluate() -> float:
        loss = MP.heldout_loss(engine, windows, train.micro_batch, topo)
        per_set = {f"heldout_loss/{name}": MP.heldout_loss(engine, w, train.micro_batch, topo)
                   for name, w in compare.items()}
        logger.log({"heldout_loss": loss, **per_set, "tokens": state["tokens"], "cumulative_flops": state["flops"]},
                   state["step"])
        return loss

    engine.train()
    steps_this_run = 0
    t_last, tok_last = time.time(), state["tokens"]
    while state["step"] < total_steps:
        t0 = time.time()
        if budget is not None:
            budget.accumulate(state["step"], sched.generation_multipliers())
        loss_acc = train_step(engine, sampler, state["samples"], train.micro_batch, train.grad_accum, dp_rank, dp)
        state["step"] += 1
        state["samples"] += global_batch
        state["tokens"] += tokens_per_step
        state["flops"] += fpt * tokens_per_step
        state["wall"] += time.time() - t0
        steps_this_run += 1
        step = state["step"]
        if step % train.log_every == 0 or step == total_steps:
            dist.all_reduce(loss_acc)
            train_loss = float(loss_acc) / (train.grad_accum * world)
            now = time.time()
            tps = (state["tokens"] - tok_last) / max(1e-9, now - t_last)
            t_last, tok_last = now, state["tokens"]
            rec = {"loss": train_loss, "tokens": state["tokens"], "tokens_per_s": tps,
                   "flops": fpt * tokens_per_step, "cumulative_flops": state["flops"],
                   "mfu": mfu(tps * fpt, train.peak_tflops, world), "lr": sched.base_lr * sched.factor()}
            rec.update({f"lr_gen{g}": lr for g, lr in sched.generation_lrs().items()})
            logger.log(rec, step)
            logger.progress(train.log_every if step % train.log_every == 0 else step % train.log_every,
                            loss=train_loss, tok_s=int(tps))
        if step % train.eval_every == 0 and step < total_steps:
            evaluate()
            if budget is not None:
                drift = MP.live_drift(engine.module, init_weights, layout, topo, budget.generations,
                                      train.zero_stage == 3)
                new = budget.adjust(step, {g: d["drift_sq"] for g, d in drift.items()}, sched.generation_multipliers())
                for g, m in new.items():
                    if m != sched.generation_multipliers()[g]:
                        sched.set_multiplier(g, m)
                logger.log({**{f"drift_sq_gen{g}": d["drift_sq"] for g, d in drift.items()},
                            **{f"multiplier_gen{g}": m for g, m in new.items()}}, step)
        preempt = stop.agreed()
        if step % train.checkpoint_every == 0 or preempt or (stop_after is not None and steps_this_run >= stop_after):
            if step < total_steps:
                save()
            if preempt or (stop_after is not None and steps_this_run >= stop_after):
                logger.close()
                if rank == 0:
                    print(f"[llmagogy] stage {stage.name}: stopped at step {step}/{total_steps}, checkpoint saved")
                return None

    save()
    final_loss = evaluate()
    moments = MP.gather_moments(engine, layout, topo)  # collective; the next stage may carry them
    # the full weights: gathered from the TP/PP ranks here, else from the checkpoint by rank 0
    weights = MP.gather_full(MP.local_tensors(engine.module, layout), layout, topo) if topo.model_parallel else None
    result = None
    if rank == 0:
        K._atomic_save(moments, sdir / "moments.pt")
        final_mults = {**mults, **sched.generation_multipliers()}
        result = finish_stage(cfg, run_dir, s, plan, data, tok, init_weights, final_loss, state, final_mults,
                              n_total, n_trainable, total_steps, sampler, mults, budget, weights, layout_key)
        end = {f"drift_gen{g['generation']}": g["drift"] for g in result["generations"][:-1]}
        end.update({f"exam/{k}": v for k, v in result["exams_all_stages"].items()})
        logger.log(end, state["step"])
        logger.summary({**end, "loss_end": final_loss, "loss_after_growth": result["loss_after_growth"]})
    logger.close()
    dist.barrier()
    return result


def finish_stage(cfg, run_dir: Path, s: int, plan, data: StageData, tok, init_weights, final_loss: float,
                 state: dict, mults: dict, n_total: int, n_trainable: int, total_steps: int, sampler,
                 initial_mults: dict | None = None, budget: DriftBudget | None = None,
                 weights: dict | None = None, layout_key: dict | None = None) -> dict:
    """Rank 0, after the final checkpoint: consolidated weights, exams, drift, result.json."""
    stage = cfg.stages[s]
    sdir = K.stage_dir(run_dir, cfg, s)
    ckpt_dir = sdir / "checkpoints"
    if weights is None:
        weights = C.load_consolidated(ckpt_dir, C.latest_complete(ckpt_dir))
    K._atomic_save(weights, sdir / "model.pt")
    layout = plan.layout(s)
    gen_of = param_generations(layout)
    drift = generation_drift(init_weights, weights, gen_of, s)
    model = plan.model(s)
    model.load_state_dict(weights)
    items = K.read_exams(data)
    exam = exam_accuracy(model, tok, items, stage.model.seq_len) if items else None
    # retention: exams of every stage so far, on the final model of this stage
    exams_all = {}
    tok_sha = file_sha(run_dir / "tokenizer.json")
    for t in range(s):
        items = K.read_exams(K.stage_data(cfg, run_dir, t, tok, tok_sha))
        if items:
            exams_all[cfg.stages[t].name] = exam_accuracy(model, tok, items, stage.model.seq_len)["accuracy"]
    if exam:
        exams_all[stage.name] = exam["accuracy"]
    growth = json.loads((sdir / "growth.json").read_text()) if (sdir / "growth.json").exists() else {}
    gens = []
    for g in range(s + 1):
        n = sum(int(np.prod(init_weights[k].shape)) for k, gg in gen_of.items() if gg == g)
        entry = {"generation": g, "stage": cfg.stages[g].name, "multiplier": mults[g], "n_params": n,
                 "drift": drift[g]["drift"] if g in drift else 0.0,
                 "drift_sq": drift[g]["drift_sq"] if g in drift else 0.0}
        if budget is not None and g in budget.generations:  # the F the drift budget chose
            entry["initial_multiplier"] = initial_mults[g]
            entry["chosen_F"] = stage.freeze.value * mults[g] / initial_mults[g] if initial_mults[g] else 0.0
        gens.append(entry)
    result = {
        "name": stage.name, "index": s, "n_params": n_total, "n_trainable": n_trainable,
        "layers": layout.n_layers, "hidden": layout.d_model, "heads": layout.n_heads, "ffn": layout.d_ffn,
        "steps": total_steps, "tokens": state["tokens"], "flops": state["flops"], "wall_seconds": state["wall"],
        "loss_prev_model": growth.get("loss_prev_model"), "loss_after_growth": growth.get("loss_after_growth"),
        "loss_at_start": state.get("loss_at_start"), "loss_end": final_loss,
        "exam_accuracy": exam["accuracy"] if exam else None,
        "exam_accuracy_after_growth": (growth.get("exam_after_growth") or {}).get("accuracy"),
        "exam_by_kind": exam.get("by_kind") if exam else None,
        "exams_all_stages": exams_all,
        "epochs": dict(zip([src["path"] for src in data.sources], sampler.epochs(state["samples"]))),
        "generations": gens,
        "drift_budget": None if budget is None else {"budget": budget.budget, "history": budget.history},
        "world_size": dist.get_world_size(), **(layout_key or {"tp": 1, "pp": 1}), "device": device_kind(),
    }
    ev = K.stage_end_eval(cfg, run_dir, s)  # the config's `eval:` section (None without one)
    if ev is not None:
        result["eval"] = ev
    K._atomic_write(sdir / "result.json", json.dumps(result, indent=1))
    K.write_summary(cfg, run_dir)
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
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
