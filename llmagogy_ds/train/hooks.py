"""Side work of the training loop as hooks (in the manner of OLMo-core's callbacks): held-out
evaluation, the drift-budget controller, metrics, checkpoints and the stop-on-signal check.

The loop (``loop.run_steps``) calls, for every hook in order, ``on_start`` once, then around
each optimizer step ``before_step`` and ``after_step``; when the stage's last step is done it
calls ``on_end`` in reverse order (the final checkpoint is written before the final evaluation). A hook reads and writes the shared ``StageRun`` (``loop.py``); a hook that sets
``run.stopped`` ends the loop after this step (preemption, ``--stop-after``).
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from llmagogy_ds.model.flops import mfu
from llmagogy_ds.model.generations import DriftBudget, schedule_factor
from llmagogy_ds.parallel import model_parallel as MP
from llmagogy_ds.parallel.optim_state import group_steps
from llmagogy_ds.train.step import rng_state


class Hook:
    def on_start(self, run) -> None:
        pass

    def before_step(self, run) -> None:
        pass

    def after_step(self, run) -> None:
        pass

    def on_end(self, run) -> None:
        pass


class MetricsHook(Hook):
    """Every ``log_every`` steps (and the last): mean train loss over the global batch,
    tokens/s, FLOPs, MFU and each generation's lr, to metrics.jsonl / wandb / the progress bar."""

    t_last = None

    def before_step(self, run) -> None:
        if self.t_last is None:  # tokens/s counts from the first step of this run, after the start eval
            self.t_last, self.tok_last = time.time(), run.state["tokens"]

    def after_step(self, run) -> None:
        train, step = run.train, run.state["step"]
        if step % train.log_every and step != run.total_steps:
            return
        loss_acc = run.last_loss
        dist.all_reduce(loss_acc)
        train_loss = float(loss_acc) / (train.grad_accum * run.world)
        now = time.time()
        tps = (run.state["tokens"] - self.tok_last) / max(1e-9, now - self.t_last)
        self.t_last, self.tok_last = now, run.state["tokens"]
        rec = {"loss": train_loss, "tokens": run.state["tokens"], "tokens_per_s": tps,
               "flops": run.fpt * run.tokens_per_step, "cumulative_flops": run.state["flops"],
               "mfu": mfu(tps * run.fpt, train.peak_tflops, run.world), "lr": run.sched.base_lr * run.sched.factor()}
        rec.update({f"lr_gen{g}": lr for g, lr in run.sched.generation_lrs().items()})
        run.logger.log(rec, step)
        run.logger.progress(train.log_every if step % train.log_every == 0 else step % train.log_every,
                            loss=train_loss, tok_s=int(tps))


class EvalHook(Hook):
    """Held-out loss at the start (after resume: the checkpoint's; after growth: in this stage's
    own layout), every ``eval_every`` steps and at the end; a baseline run also scores every
    curriculum stage's held-out set."""

    def __init__(self, every: int):
        self.every = every

    def evaluate(self, run) -> float:
        loss = run.heldout_loss(run.windows)
        per_set = {f"heldout_loss/{name}": run.heldout_loss(w) for name, w in run.compare.items()}
        run.logger.log({"heldout_loss": loss, **per_set, "tokens": run.state["tokens"],
                        "cumulative_flops": run.state["flops"]}, run.state["step"])
        return loss

    def on_start(self, run) -> None:
        topo = run.topo
        if run.resumed is not None:  # a check users see: the loss right after resume is the checkpoint's
            r = run.resumed
            run.logger.log({"event": "resume", "from": r.tag, "world_size": run.world,
                            "zero_stage": run.train.zero_stage, "tp": topo.tp, "pp": topo.pp,
                            "relayout": r.relayout, "universal": r.universal,
                            "heldout_loss": run.heldout_loss(run.windows)}, run.state["step"])
        elif run.s > 0:  # growth preserved the function in this stage's own layout (TP slices, pipeline)
            if "loss_at_start" not in run.state:  # measured already with loss_after_growth (train.grow)
                run.state["loss_at_start"] = run.heldout_loss(run.windows)
            run.logger.log({"event": "start", "tp": topo.tp, "pp": topo.pp, "world_size": run.world,
                            "heldout_loss": run.state["loss_at_start"]}, 0)

    def after_step(self, run) -> None:
        step = run.state["step"]
        if step % self.every == 0 and step < run.total_steps:
            self.evaluate(run)

    def on_end(self, run) -> None:
        run.final_loss = self.evaluate(run)


class DriftBudgetHook(Hook):
    """Drift-budget F (``freeze.auto``): each old generation's live drift, measured after every
    held-out evaluation, projected to the stage's end by its cumulative lr; a generation on
    course to exceed the budget has its lr multiplier lowered."""

    def __init__(self, run, every: int):
        train, total = run.train, run.total_steps
        olds = [g for g in range(run.s) if run.mults[g] > 0]
        self.every = every
        run.budget = DriftBudget(run.stage.freeze.drift_budget, olds,
                                 lambda t: schedule_factor(t, total, train.warmup_steps, train.schedule,
                                                           train.min_lr_ratio), total)
        if "drift_budget" in run.state:
            run.budget.load_state_dict(run.state["drift_budget"])

    def before_step(self, run) -> None:
        run.budget.accumulate(run.state["step"], run.sched.generation_multipliers())

    def after_step(self, run) -> None:
        step = run.state["step"]
        if step % self.every or step >= run.total_steps:
            return
        budget, sched = run.budget, run.sched
        drift = MP.live_drift(run.engine.module, run.init_weights, run.layout, run.topo, budget.generations,
                              run.train.zero_stage == 3)
        new = budget.adjust(step, {g: d["drift_sq"] for g, d in drift.items()}, sched.generation_multipliers())
        for g, m in new.items():
            if m != sched.generation_multipliers()[g]:
                sched.set_multiplier(g, m)
        run.logger.log({**{f"drift_sq_gen{g}": d["drift_sq"] for g, d in drift.items()},
                        **{f"multiplier_gen{g}": m for g, m in new.items()}}, step)


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


class CheckpointHook(Hook):
    """A checkpoint every ``checkpoint_every`` steps, on a stop signal (then the loop stops), after
    ``stop_after`` steps of this run (then it stops), and after the last step."""

    def __init__(self, every: int, stop_after: int | None):
        self.every, self.stop_after = every, stop_after
        self.stop = StopFlag()
        self.steps_this_run = 0

    def save(self, run) -> None:
        if run.budget is not None:
            run.state["drift_budget"] = run.budget.state_dict()
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state())
        run.checkpoints.save(run.engine, run.state["step"], {"llmagogy": dict(run.state), "rng": dict(enumerate(rngs)),
                                                              "adam_steps": group_steps(run.engine)})

    def after_step(self, run) -> None:
        self.steps_this_run += 1
        step = run.state["step"]
        preempt = self.stop.agreed()
        limit = self.stop_after is not None and self.steps_this_run >= self.stop_after
        if step % self.every == 0 or preempt or limit:
            if step < run.total_steps:
                self.save(run)
            if preempt or limit:
                run.stopped = True
                run.logger.close()
                if run.rank == 0:
                    print(f"[llmagogy] stage {run.stage.name}: stopped at step {step}/{run.total_steps}, "
                          "checkpoint saved")

    def on_end(self, run) -> None:
        self.save(run)


__all__ = ["Hook", "MetricsHook", "EvalHook", "DriftBudgetHook", "CheckpointHook", "StopFlag"]
