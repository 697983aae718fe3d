"""benchmarks/gpu_check.sh: its CPU mode runs every part of the GPU check at tiny shapes, and the
JSON it writes holds real figures (issue 11 item 6)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_tokenizer_has_the_planned_vocabulary(tmp_path):
    from llmagogy_ds.data.corpus import EOS, load_tokenizer

    gc = load_check()
    tok = load_tokenizer(gc.synthetic_tokenizer(700, tmp_path / "tok.json"))  # the trainer's loader accepts it
    assert tok.get_vocab_size() == 700 and tok.token_to_id(EOS) == 699
    text = "12 + 35 = 47, carry the one."
    ids = tok.encode(text).ids
    assert max(ids) < 700 and tok.decode(ids) == text


def test_plan_kind_of_device_names():
    gc = load_check()
    assert gc.plan_kind("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gc.plan_kind("NVIDIA H100 PCIe") == "h100-pcie"
    assert gc.plan_kind("NVIDIA H200") == "h200"
    assert gc.plan_kind("cpu (2 cores)") == "cpu"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.multiprocess
def test_gpu_check_cpu_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "OUT")}
    env["PYTHON"] = sys.executable
    # the budget allows for a loaded 2-core machine; alone there it takes about 90 s
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--budget", "900"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1000)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in res["parts"].items() if not v["ok"]}
    assert not failed and proc.returncode == 0, failed
    assert res["mode"] == "cpu" and res["torch"] and res["device"].startswith("cpu")
    assert set(res["parts"]) == {"tiny", "stage_none", "stage_full", "growth"}

    tiny = res["parts"]["tiny"]  # the tiny curriculum end to end, bf16, one process
    assert [s["name"] for s in tiny["stages"]] == ["nursery", "primary", "middle"]
    for s in tiny["stages"]:
        assert s["status"] == "done" and s["steps"] == 4 and finite(s["loss_end"]) and s["tokens_per_s"] > 0
    for s in tiny["stages"][1:]:
        assert finite(s["loss_prev_model"]) and finite(s["loss_after_growth"])

    none = res["parts"]["stage_none"]  # the big stage's figures next to the plan's
    assert none["available"] and none["steps"] == 4 and none["precision"] == "bf16"
    assert none["tokens_per_s"] > 0 and none["mfu"] > 0
    assert none["n_params"] == none["plan"]["n_params"] and none["vocab"] == res["shapes"]["vocab"]
    assert none["flops_per_token"] == pytest.approx(none["plan"]["flops_per_token"])
    assert none["memory"]["peak_rss_gib"] >= none["memory"]["before_steps_gib"] > 0
    assert 0 < none["measured_over_plan"]["peak_rss"] < 10
    full = res["parts"]["stage_full"]
    if full["available"]:
        assert full["activation_checkpointing"] == "full" and full["tokens_per_s"] > 0
        # recomputation changes no number: the same weights and data give the same losses
        assert full["losses"] == pytest.approx(none["losses"], abs=1e-6)
    else:
        assert full["reason"].startswith("not available")

    growth = res["parts"]["growth"]  # function preservation, checked and in the grown stage's own layout
    assert growth["precision"] == "fp32"
    assert growth["abs_diff_growth"] <= 1e-5 and growth["abs_diff_in_layout"] <= 1e-5
    assert finite(growth["loss_prev_model"]) and growth["grown_steps"]["tokens_per_s"] > 0


def test_graded_gpu_config_scales_graded_up():
    """configs/graded-gpu.yaml (benchmarks/graded_gpu.sh): graded.yaml's stages and corpora, wider,
    longer, bf16 on one process, and every stage fits one H100 by the plan."""
    from llmagogy_ds.cluster.plan import plan_curriculum
    from llmagogy_ds.config import load_config

    small = load_config(ROOT / "configs" / "graded.yaml", check_files=False)
    big = load_config(ROOT / "configs" / "graded-gpu.yaml", check_files=False)
    assert [s.name for s in big.stages] == [s.name for s in small.stages]
    for a, b in zip(small.stages, big.stages):
        assert [d.path for d in b.data] == [d.path for d in a.data]
        assert b.model.hidden >= 4 * a.model.hidden and b.train.tokens > a.train.tokens
        assert b.train.precision == "bf16" and b.train.nproc == 1
    assert big.baseline.compute_factor >= 3
    plans = plan_curriculum(big, gpu="h100")
    assert all(p.fits for p in plans)
    assert sum(p.steps for p in plans) < 1000  # minutes on one GPU, not hours
