"""`llmagogy report`: FLOPs-to-target on hand-made curves, metrics reading, and report.md + plots
from hand-written run directories (no training)."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmagogy_ds.evidence import baseline as B
from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.evidence import report as R
from llmagogy_ds.config import config_from_dict

RAW = {
    "run": {"name": "fake", "seed": 1},
    "tokenizer": {"vocab_size": 320},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32}, "train": {"micro_batch": 2, "nproc": 1}},
    "stages": [
        {"name": "nursery", "data": [{"path": "synthetic:level0"}],
         "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}, "train": {"tokens": 640}},
        {"name": "primary", "data": [{"path": "synthetic:level1"}, {"path": "synthetic:level0", "weight": 0.25}],
         "model": {"layers": 2, "hidden": 48, "heads": 3, "ffn": 96}, "train": {"tokens": 640},
         "growth": {"depth": "identity"}, "freeze": 0.5},
    ],
}


# --------------------------------------------------------------------------- FLOPs to target
def test_flops_to_target_interpolates_between_the_evals_around_the_crossing():
    pts = [(100.0, 3.0), (200.0, 2.5), (300.0, 1.5), (450.0, 1.2)]
    assert R.flops_to_target(pts, 2.0) == pytest.approx(250.0)  # 200 + (2.5 - 2.0) / (2.5 - 1.5) * 100
    assert R.flops_to_target(pts, 1.5) == pytest.approx(300.0)  # exactly at an eval
    assert R.flops_to_target(pts, 1.3) == pytest.approx(300.0 + 0.2 / 0.3 * 150.0)
    assert R.flops_to_target(list(reversed(pts)), 2.0) == pytest.approx(250.0)  # order of the records
    # the first crossing counts, not a later one after the curve went back up
    assert R.flops_to_target([(1.0, 5.0), (2.0, 3.0), (3.0, 6.0), (4.0, 1.0)], 4.0) == pytest.approx(1.5)


def test_flops_to_target_not_reached_and_first_eval():
    assert R.flops_to_target([(100.0, 3.0), (450.0, 2.2)], 2.0) is None
    assert R.flops_to_target([], 2.0) is None
    assert R.flops_to_target([(100.0, 1.0), (200.0, 0.5)], 2.0) == 100.0  # reached by the first eval: its FLOPs
    assert R.flops_to_target([(100.0, math.nan), (200.0, 3.0), (300.0, 1.0)], 2.0) == pytest.approx(250.0)


def test_read_metrics_keeps_the_last_record_of_a_step_and_skips_events(tmp_path):
    lines = [
        {"step": 10, "loss": 3.0, "cumulative_flops": 10.0},
        {"step": 20, "heldout_loss": 2.9, "tokens": 1, "cumulative_flops": 20.0},
        {"step": 30, "heldout_loss": 2.8, "tokens": 1, "cumulative_flops": 30.0},  # lost to a kill...
        {"step": 20, "event": "resume", "heldout_loss": 2.9},
        {"step": 30, "heldout_loss": 2.7, "tokens": 1, "cumulative_flops": 30.0},  # ...and redone
        {"step": 30, "drift_sq_gen0": 0.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 40, "lo')
    evals, train = R.read_metrics(tmp_path)
    assert [(r["step"], r["heldout_loss"]) for r in evals] == [(20, 2.9), (30, 2.7)]
    assert [r["step"] for r in train] == [10]


# --------------------------------------------------------------------------- hand-written run dirs
def write_jsonl(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def gen(g, stage, mult, drift):
    return {"generation": g, "stage": stage, "multiplier": mult, "n_params": 10, "drift": drift, "drift_sq": drift ** 2}


def fake_curriculum(tmp_path: Path) -> Path:
    cfg = config_from_dict(copy.deepcopy(RAW), tmp_path)
    run = RD.open_run_dir(cfg, tmp_path / "cur")
    s0, s1 = run / "stages" / "00_nursery", run / "stages" / "01_primary"
    write_jsonl(s0 / "metrics.jsonl", [{"step": 1, "loss": 5.0, "cumulative_flops": 50.0},
                                       {"step": 2, "heldout_loss": 4.0, "tokens": 1, "cumulative_flops": 100.0}])
    write_jsonl(s1 / "metrics.jsonl", [{"step": 1, "loss": 4.0, "cumulative_flops": 100.0},
                                       {"step": 2, "heldout_loss": 3.0, "tokens": 1, "cumulative_flops": 150.0},
                                       {"step": 4, "heldout_loss": 2.0, "tokens": 1, "cumulative_flops": 300.0}])
    common = {"n_params": 1000, "tokens": 640, "exam_accuracy": 0.1}
    (s0 / "result.json").write_text(json.dumps({
        **common, "name": "nursery", "index": 0, "flops": 100.0, "loss_end": 4.0, "loss_after_growth": None,
        "epochs": {"synthetic:level0": 1.5}, "exams_all_stages": {"nursery": 0.1},
        "generations": [gen(0, "nursery", 1.0, 0.0)],
        "eval": {"heldout": {"nursery": {"loss": 4.0}, "primary": {"loss": 5.5}},
                 "exams": {"/x/mc.jsonl": {"accuracy": 0.3, "chance": 0.25, "n": 4}},
                 "pairs": {"/x/blimp.jsonl": {"accuracy": 0.55, "n": 10}}}}))
    (s1 / "growth.json").write_text(json.dumps({"loss_prev_model": 5.5, "loss_after_growth": 5.5}))
    (s1 / "result.json").write_text(json.dumps({
        **common, "name": "primary", "index": 1, "flops": 300.0, "loss_end": 2.0, "loss_after_growth": 5.5,
        "epochs": {"synthetic:level1": 2.0, "synthetic:level0": 0.25},
        "exams_all_stages": {"nursery": 0.2, "primary": 0.4},
        "generations": [gen(0, "nursery", 0.5, 0.3), gen(1, "primary", 1.0, 0.0)],
        "eval": {"heldout": {"nursery": {"loss": 3.5}, "primary": {"loss": 2.0}},
                 "exams": {"/x/mc.jsonl": {"accuracy": 0.5, "chance": 0.25, "n": 4}},
                 "pairs": {"/x/blimp.jsonl": {"accuracy": 0.7, "n": 10}}}}))
    return run


def fake_baseline(tmp_path: Path, name: str, primary_curve: list[tuple[float, float]]) -> Path:
    cfg = config_from_dict(copy.deepcopy(RAW), tmp_path)
    derived, _ = B.derive_config(cfg, 320, [B.StageBudget("nursery", 10, 640, 100.0),
                                           B.StageBudget("primary", 10, 640, 300.0)])
    run = RD.open_run_dir(derived, tmp_path / name)
    (run / RD.CURRICULUM).write_text(cfg.to_yaml())
    recs = [{"step": i, "heldout_loss": l, "heldout_loss/nursery": l + 0.5, "heldout_loss/primary": l,
             "tokens": 1, "cumulative_flops": f} for i, (f, l) in enumerate(primary_curve, 1)]
    sdir = run / "stages" / "00_baseline"
    write_jsonl(sdir / "metrics.jsonl", recs)
    (sdir / "result.json").write_text(json.dumps({
        "name": "baseline", "index": 0, "flops": primary_curve[-1][0], "loss_end": primary_curve[-1][1],
        "generations": [gen(0, "baseline", 1.0, 0.0)],
        "eval": {"heldout": {"nursery": {"loss": 9.0, "exam": {"accuracy": 0.05}}, "primary": {"loss": 8.0}},
                 "exams": {"/x/mc.jsonl": {"accuracy": 0.25, "chance": 0.25}},
                 "pairs": {"/x/blimp.jsonl": {"accuracy": 0.6}}}}))
    return run


def test_report_with_a_baseline_that_reaches_the_target(tmp_path):
    cur = fake_curriculum(tmp_path)
    base = fake_baseline(tmp_path, "base", [(100.0, 3.0), (200.0, 2.5), (300.0, 1.5), (450.0, 1.2)])
    res = R.write_report(cur, base, tmp_path / "out")
    cmp = res["comparison"]
    assert cmp["target"] == 2.0 and cmp["curriculum_flops"] == 400.0  # the final stage's loss_end; 100 + 300
    assert cmp["flops_to_target"] == pytest.approx(250.0) and cmp["ratio"] == pytest.approx(0.625)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| FLOPs-to-target ratio | **0.62** (the baseline reaches 2.0000 at 250 FLOPs) |" in md
    assert "| baseline final held-out loss (primary set) | 1.2000 |" in md
    assert "| nursery | 4.0000 | 3.5000 | 1.7000 |" in md  # own stage end, final model, baseline (1.2 + 0.5)
    assert "| primary | synthetic:level0 | 0.25 |" in md  # epochs per corpus per stage
    assert "| primary | 0 (nursery) | 0.5 | - | 0.3000 | 0.0900 |" in md  # multiplier and drift
    assert "| mc.jsonl | 30.0% | 50.0% | 25.0% | 25.0% |" in md  # per stage end, baseline, chance
    assert "| nursery exam | 10.0% | 20.0% | 5.0% | - |" in md
    for png in ("loss_vs_flops", "curriculum_vs_baseline", "exams", "generations"):
        assert res["plots"][png] == tmp_path / "out" / f"{png}.png"
        assert res["plots"][png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png}.png)" in md
    # the curriculum's curve on the primary set: the nursery model at its end, the grown model, the stage's evals
    points = R.curriculum_points(R.load_curriculum(cur), "primary")
    assert points == [(100.0, 5.5), (100.0, 5.5), (250.0, 3.0), (400.0, 2.0)]


def test_report_with_a_baseline_that_does_not_reach_it(tmp_path, capsys):
    cur = fake_curriculum(tmp_path)
    base = fake_baseline(tmp_path, "base", [(100.0, 3.0), (450.0, 2.2)])
    assert cli.main(["report", str(cur), "--baseline", str(base)]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (cur / "report" / "report.md").read_text()  # default --out: RUN_DIR/report
    assert "**not reached** (the baseline's best is 2.2000 after 450 FLOPs, so the ratio is > 1.12)" in md


def test_report_without_a_baseline_and_an_unfinished_stage(tmp_path):
    cur = fake_curriculum(tmp_path)
    (cur / "stages" / "01_primary" / "result.json").unlink()
    res = R.write_report(cur)
    assert set(res["plots"]) == {"loss_vs_flops", "exams"}  # generations: one finished stage has no old ones
    md = res["report"].read_text()
    assert "NOT FINISHED" in md and "| primary | not finished |" in md
    c = R.load_curriculum(cur)
    assert c.stages[1].offset == 100.0 and c.stages[1].end == 400.0  # the running stage's last logged FLOPs
    assert not c.done and "(1 of 2 stages, NOT FINISHED)" in md
    # a stage not even started: the curriculum is not done, and there is no target to compare with
    base = fake_baseline(tmp_path, "base", [(100.0, 3.0), (200.0, 1.0)])
    shutil.rmtree(cur / "stages" / "01_primary")
    c = R.load_curriculum(cur)
    assert [s.name for s in c.stages] == ["nursery"] and not c.done
    cmp = R.comparison(c, R.load_baseline(base, c))
    assert cmp["target"] is None and cmp["ratio"] is None


def test_report_refuses_what_it_cannot_compare(tmp_path, capsys):
    cur = fake_curriculum(tmp_path)
    assert cli.main(["report", str(cur), "--baseline", str(cur)]) == 2
    assert "not a baseline run" in capsys.readouterr().err
    base = fake_baseline(tmp_path, "base", [(100.0, 3.0)])

    def stage_cache(run, fp, heldout):  # a primary cache of one source: its held-out tokens in a numpy file
        d = run / "data" / f"primary-{fp}"
        d.mkdir(parents=True)
        np.asarray(heldout, dtype=np.uint16).tofile(d / "heldout.bin")
        src = {"path": "p", "weight": 1.0, "train": "heldout.bin", "heldout": "heldout.bin", "train_tokens": len(heldout),
               "heldout_tokens": len(heldout)}
        (d / "meta.json").write_text(json.dumps({"sources": [src], "dtype": "uint16"}))
        return d

    stage_cache(cur, "0123456789abcdef", [5, 6, 7, 8])
    other = stage_cache(base, "fedcba9876543210", [5, 6, 7, 9])
    with pytest.raises(RD.RunDirError, match="different held-out data"):
        R.write_report(cur, base, tmp_path / "out")
    # another fingerprint (the corpus copied or touched since), the same held-out tokens: comparable
    shutil.rmtree(other)
    stage_cache(base, "fedcba9876543210", [5, 6, 7, 8])
    assert R.load_baseline(base, R.load_curriculum(cur)).run_dir == base
    empty = RD.open_run_dir(config_from_dict(copy.deepcopy(RAW), tmp_path), tmp_path / "empty")
    with pytest.raises(RD.RunDirError, match="no finished stage"):
        R.write_report(empty)
