"""Tensor and pipeline parallelism give the tp=1, pp=1 model's loss and gradients.

One 4-process torchrun (CPU, gloo) runs tests/parallel_check.py: the same grown
3-generation weights and batch under tp=2 (dp=2), pp=2 (dp=2) and tp=2 × pp=2; tp=2 and pp=2
with activation checkpointing; a grouped-query attention model at tp=2 and tp=2 × pp=2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from llmagogy_ds.model.layout import Shape, stage_layouts
from llmagogy_ds.parallel.tensor_parallel import check_divisible, merge_shards, shard_state_dict
from llmagogy_ds.parallel.pipeline import canonical_name, pipe_name
from llmagogy_ds.model.gpt import fresh_init

ROOT = Path(__file__).resolve().parents[1]


def layout3():
    shapes = [Shape(2, 32, 2, 64), Shape(3, 64, 4, 96), Shape(4, 96, 6, 128)]
    return stage_layouts(shapes, [None, ("identity", "interleave"), ("identity", "top")], 64, 16)[-1][0]


@pytest.mark.multiprocess
def test_tp2_pp2_and_tp2xpp2_equal_tp1(tmp_path):
    out = tmp_path / "parallel.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                           "--master_port", str(free_port()), str(ROOT / "tests" / "parallel_check.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    n = len(fresh_init(layout3(), 0.02, torch.Generator().manual_seed(0)))
    keys = ("tp2_pp1", "tp1_pp2", "tp2_pp2", "tp2_pp1_ckpt", "tp1_pp2_ckpt", "gqa_tp2_pp1", "gqa_tp2_pp2_ckpt")
    for key in keys:
        r = res[key]
        assert r["loss"] == pytest.approx(res["gqa_ref" if key.startswith("gqa") else "ref"], abs=1e-5), key
        assert r["n_grads"] == r["n_ref"], key  # every piece's gradient came back, gathered to full size
        assert r["grad_max_abs_err"] <= 1e-5 * max(1.0, r["grad_scale"]), key
    assert res["tp2_pp1"]["n_grads"] == n
    # activation checkpointing recomputes the same function: the same gradients (fp32)
    for key in ("tp2_pp1_ckpt", "tp1_pp2_ckpt"):
        assert res[key]["grad_err_vs_no_ckpt"] <= 1e-6, key


def test_shard_merge_roundtrip_keeps_generation_pieces():
    lay = layout3()
    full = fresh_init(lay, 0.02, torch.Generator().manual_seed(0))
    shards = [shard_state_dict(full, lay, 2, r) for r in range(2)]
    # a writer is split along its columns, a reader along its rows, norms replicated
    k_w, k_r, k_n = "blocks.0.attn.wo.r1c1", "blocks.0.ffn.w1.r2c0", "blocks.0.attn_norm.s1"
    assert shards[0][k_w].shape == (full[k_w].shape[0], full[k_w].shape[1] // 2)
    assert shards[1][k_r].shape == (full[k_r].shape[0] // 2, full[k_r].shape[1])
    assert torch.equal(shards[0][k_n], full[k_n]) and torch.equal(shards[1][k_n], full[k_n])
    back = merge_shards(shards, lay)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)


def test_tp_divisibility_errors_name_the_generation():
    lay = stage_layouts([Shape(2, 32, 2, 64), Shape(2, 48, 3, 91)], [None, ("identity", "top")], 64, 16)[-1][0]
    errs = check_divisible(lay, 2)
    assert any("generation 1 adds 1 heads" in e for e in errs)
    assert any("generation 1 adds 27 FFN units" in e for e in errs)
    assert check_divisible(layout3(), 2) == []


def test_pipe_names_roundtrip():
    for name in ("tok_emb.r0c1", "blocks.3.attn.wq.r0c0", "norm.s2", "lm_head.r0c0"):
        assert canonical_name(pipe_name(name, 4), 4) == name
    assert pipe_name("blocks.0.ffn.w2.r0c0", 4) == "1.ffn.w2.r0c0" and pipe_name("norm.s0", 4) == "5.norm.s0"
