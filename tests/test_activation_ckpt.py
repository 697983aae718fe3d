"""Activation checkpointing (``train.activation_checkpointing: none | full | every: k``): the
config key and its errors, the same loss and gradients as without it at tp=1 (fp32 and bf16,
frozen generations, GQA), ``plan``'s memory with it, and a measured CPU peak lower with it
and within 20 % of the estimate. tp=2 and pp=2 run in tests/parallel_check.py; a pp=2 stage
trains with it in tests/test_tp_pp_stage.py."""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

from llmagogy_ds.cluster.memory import estimate_memory
from llmagogy_ds.cluster.plan import format_plan, plan_curriculum
from llmagogy_ds.config import ConfigError, config_from_dict
from llmagogy_ds.model.generations import multipliers
from llmagogy_ds.model.gpt import GPT, fresh_init
from llmagogy_ds.model.growth import grow_through
from llmagogy_ds.model.layout import Shape, stage_layouts
from llmagogy_ds.parallel.recompute import RecomputeBlocks, block_runner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
torch.set_num_threads(1)

BASE = {
    "run": {"name": "t"}, "tokenizer": {"vocab_size": 512},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32}, "train": {"micro_batch": 2, "nproc": 2}},
    "stages": [
        {"name": "a", "data": [{"path": "synthetic:level0"}], "train": {"tokens": 10000},
         "model": {"layers": 2, "hidden": 64, "heads": 4, "ffn": 64}},
        {"name": "b", "data": [{"path": "synthetic:level1"}], "train": {"tokens": 20000},
         "model": {"layers": 4, "hidden": 96, "heads": 6, "ffn": 128}},
    ],
}


def cfg_with(tmp_path, stage_ac=None, default_ac=None):
    raw = copy.deepcopy(BASE)
    if default_ac is not None:
        raw["defaults"]["train"]["activation_checkpointing"] = default_ac
    if stage_ac is not None:
        raw["stages"][1]["train"]["activation_checkpointing"] = stage_ac
    return config_from_dict(raw, tmp_path)


def test_config_key_forms_and_errors(tmp_path):
    cfg = cfg_with(tmp_path)
    assert [s.train.recompute_interval for s in cfg.stages] == [0, 0]
    cfg = cfg_with(tmp_path, stage_ac={"every": 3}, default_ac="full")
    assert [s.train.recompute_interval for s in cfg.stages] == [1, 3]
    assert cfg.raw["stages"][1]["train"]["activation_checkpointing"] == {"every": 3}
    assert cfg_with(tmp_path, stage_ac="none", default_ac="full").stages[1].train.recompute_interval == 0
    for bad in ("partial", {"every": 0}, {"every": 2, "offload": True}, {"every": "2"}, True, 2):
        with pytest.raises(ConfigError, match=r"stages\[1\] \(b\)\.train\.activation_checkpointing: must be none, "
                                              r"full or \{every: k\}"):
            cfg_with(tmp_path, stage_ac=bad)
    with pytest.raises(ConfigError, match=r"defaults\.train\.activation_checkpointing"):
        cfg_with(tmp_path, default_ac={"every": -1})  # reported once, where it was written


def grown(shapes):
    layouts = stage_layouts(shapes, [None] + [("identity", "interleave")] * (len(shapes) - 1), 64, 16)
    sd = grow_through(fresh_init(layouts[0][0], 0.05, torch.Generator().manual_seed(0)), layouts, len(shapes) - 1)
    return layouts[-1][0], {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}


def loss_and_grads(layout, sd, every, dtype=torch.float32, frozen=()):
    m = GPT(layout, 32, block_runner=block_runner(every)).to(dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    for p in m.parameters():
        p.requires_grad_(p.generation not in frozen)
    x = torch.randint(0, 64, (3, 33), generator=torch.Generator().manual_seed(1))
    loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("frozen", [(), (0, 1)], ids=["all-train", "F0-earlier"])
def test_same_loss_and_gradients_as_without(dtype, frozen):
    """Generation pieces (3 generations), GQA, frozen earlier generations (their embedding output
    needs no grad, which a reentrant checkpoint would silently drop)."""
    layout, sd = grown([Shape(2, 32, 2, 48, 1), Shape(3, 64, 4, 64, 2), Shape(5, 96, 6, 96, 3)])
    loss0, g0 = loss_and_grads(layout, sd, 0, dtype, frozen)
    assert all(v.abs().sum() > 0 for v in g0.values())
    for every in (1, 2, 5):
        loss, g = loss_and_grads(layout, sd, every, dtype, frozen)
        assert g.keys() == g0.keys()
        assert float(loss) == float(loss0)
        err = max((g[k] - g0[k]).abs().max().item() for k in g0)
        assert err <= (1e-6 if dtype == torch.float32 else 1e-2 * max(v.abs().max().item() for v in g0.values()))


def test_groups_of_blocks_and_evaluation_without_recompute(monkeypatch):
    import llmagogy_ds.parallel.recompute as R

    calls = []
    real = R.checkpoint
    monkeypatch.setattr(R, "checkpoint", lambda fn, group, *a, **kw: (calls.append(len(group)), real(fn, group, *a,
                                                                                                       **kw))[1])
    layout, sd = grown([Shape(5, 32, 2, 48)])
    m = GPT(layout, 32, block_runner=RecomputeBlocks(2))
    m.load_state_dict(sd)
    x = torch.randint(0, 64, (2, 33))
    m(x[:, :-1], x[:, 1:]).backward()
    assert calls == [2, 2, 1]  # 5 blocks in groups of 2
    with torch.no_grad():
        m(x[:, :-1], x[:, 1:])
    assert calls == [2, 2, 1]  # nothing to keep for a backward: plain forward
    assert block_runner(0) is None
    with pytest.raises(ValueError, match=">= 1 blocks"):
        RecomputeBlocks(0)


def test_plan_counts_recomputation(tmp_path):
    layout, _ = grown([Shape(2, 32, 2, 48), Shape(8, 64, 4, 128)])
    kw = dict(seq_len=256, micro_batch=8, precision="bf16", zero_stage=1, dp=4)
    mults = multipliers([1.0, 0.0], 1)
    none, full, two = (estimate_memory(layout, mults, recompute=k, **kw) for k in (0, 1, 2))
    assert none.model_states == full.model_states == two.model_states
    assert full.dynamic < two.dynamic < none.dynamic
    # full: 8 block inputs (2 bytes x 64 per token) + the final norm kept; one block recomputed
    tokens, final = 8 * 256, (4 * 64 + 2 * 2 * 64 + 4) * 8 * 256
    assert full.activations == pytest.approx(8 * 2 * 64 * tokens + final, rel=1e-9)
    # the largest group recomputed: a block (an old one, with assembled multi-piece weights) or two
    per_block = (none.activations - final) / 8
    assert per_block < full.recomputed < two.recomputed <= 2 * full.recomputed and none.recomputed == 0
    # pipeline: the first rank keeps the group inputs of every micro batch in flight, recomputes one group
    p_none = estimate_memory(layout, mults, recompute=0, pp=2, grad_accum=4, pp_rank=0, **kw)
    p_full = estimate_memory(layout, mults, recompute=1, pp=2, grad_accum=4, pp_rank=0, **kw)
    assert p_none.in_flight == 2 and p_full.dynamic < p_none.dynamic / 2
    # the plan reads it from the config and says so
    plans = plan_curriculum(cfg_with(tmp_path, stage_ac="full"), gpu="h100")
    base = plan_curriculum(cfg_with(tmp_path), gpu="h100")
    assert plans[1].activation_checkpointing == "full" and plans[1].memory.dynamic < base[1].memory.dynamic
    assert plans[0].memory.total == base[0].memory.total
    assert "recomputed in backward): b (full)" in format_plan(plans)
    assert "recomputed in backward)" not in format_plan(base)


linux_only = pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists("/proc/self/statm")),
                                reason="measures RSS through /proc and glibc's malloc settings")


@linux_only
def test_measured_peak_lower_with_it_and_plan_within_20_percent():
    """benchmarks/activation_checkpointing.py's measurement at the tiny config's last stage
    (docs/benchmarks.md has the figures): full recomputation lowers the peak, and the plan's
    estimate with it on is within 20 % of the measured peak."""
    from activation_checkpointing import measure

    none = measure(ROOT / "configs" / "tiny.yaml", 2, "none")  # step 2: with Adam states allocated
    full = measure(ROOT / "configs" / "tiny.yaml", 2, "full")
    print(f"\npeak above baseline: none {none['measured'] / 2**20:.1f} MiB, full {full['measured'] / 2**20:.1f} MiB "
          f"(estimate {full['estimate'] / 2**20:.1f} MiB)")
    assert full["measured"] < 0.6 * none["measured"]
    assert full["measured"] == pytest.approx(full["estimate"], rel=0.20)
    assert full["loss"] == pytest.approx(none["loss"], abs=1e-6)
