"""Generations and the freeze coefficient F → DeepSpeed parameter groups.

Every parameter belongs to the stage (generation) that added it. At stage ``s`` the
learning rate of generation ``g`` is ``lr × F_(g+1) × … × F_s`` where ``F_t`` is the
``freeze`` of stage ``t``: F = 1/2 gives 1/2, 1/4, 1/8 … for older generations, F = 0
freezes. A multiplier of 0 means ``requires_grad=False`` and no param group at all, so
frozen generations hold no optimizer state (DeepSpeed fixes the trainable set at
``deepspeed.initialize`` and silently drops empty groups, so this is decided before).

``GenerationLR`` is the scheduler: lr = base lr × schedule(step) × group multiplier.
DeepSpeed's WarmupLR/WarmupDecayLR would overwrite the per-group multipliers.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch


def multipliers(freezes: Sequence[float], stage: int,
                chosen: Mapping[tuple[int, int], float] | None = None) -> dict[int, float]:
    """lr multiplier of every generation ``g <= stage``; ``freezes[t]`` is F of stage t.

    ``chosen[(t, g)]``, where given, is the F stage ``t`` chose for generation ``g`` (a
    drift-budget stage) and replaces ``freezes[t]`` for that generation."""
    chosen = chosen or {}
    out = {}
    for g in range(stage + 1):
        m = 1.0
        for t in range(g + 1, stage + 1):
            m *= chosen.get((t, g), freezes[t])
        out[g] = m
    return out


def param_groups(
    model: torch.nn.Module,
    generation_of: dict[str, int],
    mults: dict[int, float],
    weight_decay: float,
) -> list[dict]:
    """One group per (trainable generation × decay/no-decay); frozen params get no group.

    Sets ``requires_grad`` from the multipliers. Vectors (RMSNorm gains) get no weight decay.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        g = generation_of[name]
        m = mults[g]
        p.requires_grad_(m > 0)
        if m == 0:
            continue
        decay = p.ndim >= 2
        key = (g, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "names": [], "generation": g, "multiplier": m,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"gen{g}" + ("" if decay else "_nodecay"),
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    ordered = [groups[k] for k in sorted(groups)]
    for grp in ordered:
        grp.pop("names")
    return ordered


def schedule_factor(step: int, total_steps: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Base-lr factor at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GenerationLR:
    """Per-generation learning rates; a DeepSpeed-compatible scheduler (step/state_dict)."""

    def __init__(self, optimizer, base_lr: float, total_steps: int, warmup: int,
                 kind: str = "cosine", min_ratio: float = 0.1):
        self.optimizer = optimizer
        self.base_lr, self.total_steps, self.warmup = base_lr, total_steps, warmup
        self.kind, self.min_ratio = kind, min_ratio
        self.last_step = 0
        # kept here too: a ZeRO-3 universal load rewrites the groups' own keys
        self.multipliers = {g["name"]: g.get("multiplier", 1.0) for g in optimizer.param_groups if "name" in g}
        self.apply()

    def factor(self) -> float:
        return schedule_factor(self.last_step, self.total_steps, self.warmup, self.kind, self.min_ratio)

    def apply(self) -> None:
        """Set every group's lr from the schedule and its multiplier (also after a checkpoint
        load has rewritten the groups)."""
        f = self.factor()
        for g in self.optimizer.param_groups:
            if g.get("name") in self.multipliers:
                g["multiplier"] = self.multipliers[g["name"]]
            g["lr"] = self.base_lr * f * g.get("multiplier", 1.0)

    def step(self, *_args, **_kwargs) -> None:
        self.last_step += 1
        self.apply()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    get_last_lr = get_lr

    def generation_multipliers(self) -> dict[int, float]:
        return {g["generation"]: g["multiplier"] for g in self.optimizer.param_groups if "generation" in g}

    def generation_lrs(self) -> dict[int, float]:
        return {g["generation"]: g["lr"] for g in self.optimizer.param_groups if "generation" in g}

    def set_multiplier(self, generation: int, value: float) -> None:
        """Lower (or raise) a generation's multiplier mid-stage (drift-budget F)."""
        for g in self.optimizer.param_groups:
            if g.get("generation") == generation:
                self.multipliers[g["name"]] = value
        self.apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup": self.warmup, "kind": self.kind, "min_ratio": self.min_ratio,
                "multipliers": dict(self.multipliers)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"]
        self.multipliers.update({k: v for k, v in state.get("multipliers", {}).items() if k in self.multipliers})
        self.apply()


def relative_drift(start: Iterable[torch.Tensor], end: Iterable[torch.Tensor]) -> dict[str, float]:
    """‖θ_end − θ_start‖ / ‖θ_start‖ over a generation's tensors, and its squared form."""
    num = den = 0.0
    for a, b in zip(start, end):
        a64, b64 = a.detach().double(), b.detach().double()
        num += float((b64 - a64).pow(2).sum())
        den += float(a64.pow(2).sum())
    if den == 0.0:
        return {"drift": 0.0 if num == 0.0 else math.inf, "drift_sq": 0.0 if num == 0.0 else math.inf}
    return {"drift": math.sqrt(num / den), "drift_sq": num / den}


def generation_drift(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                     generation_of: dict[str, int], upto: int) -> dict[int, dict[str, float]]:
    """Drift of every generation ``< upto`` between two full state dicts."""
    out = {}
    for g in range(upto):
        names = [n for n, gg in generation_of.items() if gg == g]
        out[g] = relative_drift((start[n] for n in names), (end[n] for n in names))
    return out





class DriftBudget:
    """Drift-budget F: keep each old generation's relative drift within a budget by the end of
    the stage, with its multiplier as close to the configured one as possible.

    Drift is the article's form, Σ(θ − θ_start)² / Σθ_start² (``drift_sq``), measured every
    ``check`` from the live parameters. Adam moves a parameter by about lr per step in a steady
    direction, so the modulus drift √drift_sq grows with the generation's cumulative lr. At a
    check, the drift projected to the end of the stage is
    √d · (1 + remaining lr-sum / lr-sum so far) at the current multiplier; when that exceeds
    ``margin`` × √budget, the multiplier is scaled so that the remaining movement fits what is
    left of the budget (0 once the budget is spent: lr 0, the generation stops moving).
    """

    def __init__(self, budget: float, generations: list[int], schedule, total_steps: int, margin: float = 0.9):
        self.budget, self.generations, self.margin = budget, generations, margin
        self.schedule, self.total_steps = schedule, total_steps
        self.lr_done = {g: 0.0 for g in generations}  # Σ multiplier × schedule factor so far
        self.history: list[dict] = []

    def accumulate(self, step: int, mults: dict[int, float]) -> None:
        """Call once per optimizer step (0-based ``step``) with the multipliers used in it."""
        f = self.schedule(step)
        for g in self.generations:
            self.lr_done[g] += f * mults[g]

    def state_dict(self) -> dict:
        return {"lr_done": dict(self.lr_done), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.lr_done = {int(k): v for k, v in state["lr_done"].items()}
        self.history = list(state["history"])

    def adjust(self, step: int, drift_sq: dict[int, float], mults: dict[int, float]) -> dict[int, float]:
        """New multipliers after ``step`` optimizer steps given the measured drift."""
        remaining = sum(self.schedule(t) for t in range(step, self.total_steps))
        target = self.margin * self.budget ** 0.5
        new = dict(mults)
        for g in self.generations:
            d, m, done = drift_sq[g] ** 0.5, mults[g], self.lr_done[g]
            if m == 0 or done == 0:
                continue
            rate = d / done  # modulus drift per unit of lr-sum
            projected = d + rate * m * remaining
            if projected > target:
                new[g] = 0.0 if d >= target or rate == 0 else max(0.0, m * (target - d) / (rate * m * remaining))
        self.history.append({"step": step, "drift_sq": dict(drift_sq), "multipliers": dict(new)})
        return new


__all__ = ["multipliers", "param_groups", "schedule_factor", "GenerationLR", "relative_drift",
           "generation_drift", "DriftBudget"]
