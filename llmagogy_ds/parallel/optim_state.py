"""Adam moments across growth: read them out of a DeepSpeed engine per parameter, put grown
ones back into the next stage's engine.

ZeRO 1/2/3 keep fp32 optimizer state in flat partitions; DeepSpeed's tensor-fragment API
(``safe_get/safe_set_full_optimizer_state``) maps a parameter to its fragments. ZeRO-0 keeps
a plain torch optimizer. Adam's step count lives per flat group; the groups are one per
generation (× decay), so a generation's step count is restored on its groups.
"""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

KEYS = ("exp_avg", "exp_avg_sq")


def base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _state_tensors(engine):
    """(param group, the tensors Adam keeps state for) of every group, for any ZeRO stage."""
    opt, base = engine.optimizer, base_optimizer(engine)
    stage = engine.zero_optimization_stage()
    if stage in (1, 2):
        return [(g, [flat]) for g, flat in zip(base.param_groups, opt.single_partition_of_fp32_groups)]
    if stage == 3:
        by_group = [(g, []) for g in base.param_groups]
        for sub, flat in enumerate(opt.fp32_partitioned_groups_flat):
            by_group[opt.sub_group_to_group_id[sub]][1].append(flat)
        return by_group
    return [(g, list(g["params"])) for g in base.param_groups]


def _zero(engine) -> bool:
    return engine.zero_optimization_stage() > 0


def group_steps(engine) -> dict[int, int]:
    """Adam's step count of every generation's groups."""
    base = base_optimizer(engine)
    steps = {}
    for group, tensors in _state_tensors(engine):
        if "generation" in group:
            s = next((base.state[t]["step"] for t in tensors if "step" in base.state.get(t, {})), 0)
            steps[group["generation"]] = int(s)
    return steps


def set_group_steps(engine, steps: dict[int, int]) -> None:
    """Set Adam's step count per generation (absent generations: 0); creates missing state."""
    link_state(engine)
    base = base_optimizer(engine)
    for group, tensors in _state_tensors(engine):
        step = steps.get(group.get("generation"), 0)
        for t in tensors:
            base.state[t]["step"] = torch.tensor(float(step))


def restore_group_meta(engine, meta: list[dict], steps: dict[int, int] | None) -> None:
    """Undo DeepSpeed ZeRO-3's universal load, which copies group 0's hyperparameters into every
    group: put back each generation group's name, generation, multiplier, weight decay and steps."""
    base = base_optimizer(engine)
    for group, m in zip(base.param_groups, meta):
        group.update(m)
    if steps is not None:
        set_group_steps(engine, steps)


def group_meta(engine) -> list[dict]:
    keys = ("name", "generation", "multiplier", "weight_decay")
    return [{k: g[k] for k in keys if k in g} for g in base_optimizer(engine).param_groups]


def gather_moments(engine) -> dict:
    """Collective: every rank calls it. Full moments of every trainable param + steps per generation."""
    moments: dict[str, dict[str, torch.Tensor]] = {}
    link_state(engine)
    base = base_optimizer(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if _zero(engine):
            st = {k: safe_get_full_optimizer_state(p, k) for k in KEYS}
        else:
            st = {k: base.state.get(p, {}).get(k) for k in KEYS}
        if all(v is not None for v in st.values()):
            moments[name] = {k: v.detach().float().cpu().clone() for k, v in st.items()}
    steps = group_steps(engine)
    return {"moments": moments, "steps": steps}


def link_state(engine) -> None:
    """Create Adam's zero state where it is missing and (re)link ZeRO-1/2 fragments to it.

    Optimizers create their state at the first step; before it there is nothing to read or
    write. And DeepSpeed 0.19's ZeRO-1/2 links the fragments of *all* groups right after the
    first group's first step, while later groups have no state yet, and never again: their
    fragments stay empty. Zero state is exactly what Adam starts from.
    """
    base = base_optimizer(engine)
    for _, tensors in _state_tensors(engine):
        for t in tensors:
            if "exp_avg" not in base.state.get(t, {}):
                base.state[t] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(t) for k in KEYS}}
    if engine.zero_optimization_stage() in (1, 2):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def restore_moments(engine, grown: dict) -> int:
    """Put grown moments into a freshly initialized engine; returns how many params got some.

    Params absent from ``grown`` (new pieces) keep zero moments; a generation's groups get the
    step count it had, new generations 0.
    """
    link_state(engine)
    base = base_optimizer(engine)
    n = 0
    for name, p in engine.module.named_parameters():
        if not p.requires_grad or name not in grown["moments"]:
            continue
        st = grown["moments"][name]
        for k in KEYS:
            if _zero(engine):
                safe_set_full_optimizer_state(p, st[k].to(p.device), k)
            else:
                base.state[p][k].copy_(st[k])
        n += 1
    set_group_steps(engine, grown["steps"])
    return n
