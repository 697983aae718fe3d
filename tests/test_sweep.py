"""The sweep harness: variants sharing a prefix of stages train it once; the table, figure and
record; exact FLOPs (4·N·T for F = 0) and the growth operators in real (in-process) stages."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.evidence import sweep as SW
from llmagogy_ds.model.flops import flops_per_token
from llmagogy_ds.model.stages import Plan
from conftest import stages_in_process

CFG = {
    "run": {"name": "sw", "seed": 5},
    "tokenizer": {"vocab_size": 320},
    "wandb": {"mode": "disabled"},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32},
                 "train": {"micro_batch": 4, "nproc": 1, "zero_stage": 0, "lr": 3e-3, "warmup_steps": 4,
                           "eval_every": 16, "eval_tokens": 1024, "checkpoint_every": 1000, "log_every": 8,
                           "weight_decay": 0.0}},
    "eval": {"pairs": ["pairs.jsonl"]},
    "stages": [
        {"name": "nursery", "data": [{"path": "synthetic:level0"}],
         "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}, "train": {"tokens": 4096}},
        {"name": "primary", "data": [{"path": "synthetic:level1"}, {"path": "synthetic:level0", "weight": 0.25}],
         "model": {"layers": 2, "hidden": 64, "heads": 4, "ffn": 128}, "train": {"tokens": 4096},
         "growth": {"depth": "identity", "placement": "interleave"}, "freeze": 0.5},
    ],
}
SWEEP = {
    "config": "cfg.yaml",
    "out": "sweep",
    "baseline": "default",
    "variants": [
        {"name": "default"},
        {"name": "clone-F0", "description": "HyperCloning width, old generation frozen",
         "set": {"stages.primary.growth.init": "clone", "stages.primary.freeze": 0.0}},
        {"name": "gstack", "set": {"stages.primary.growth.depth": "gstack"}},
    ],
}


def write_sweep(d: Path, sweep: dict = SWEEP) -> Path:
    (d / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"sentence_good": "count: 1 2 3 4", "sentence_bad": "count: 1 3 2 4", "UID": "order"},
        {"sentence_good": "the dog is big.", "sentence_bad": "dog the is big.", "UID": "syntax"}]))
    (d / "cfg.yaml").write_text(yaml.safe_dump(copy.deepcopy(CFG), sort_keys=False))
    (d / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return d / "sweep.yaml"


@pytest.fixture(scope="module")
def swept(tmp_path_factory, dist_world1):
    d = tmp_path_factory.mktemp("sweep")
    path = write_sweep(d)
    with stages_in_process() as launched:
        assert cli.main(["sweep", str(path)]) == 0
        first = [(name, stage) for name, stage, _ in launched]
        assert cli.main(["sweep", str(path)]) == 0  # a re-run: everything is done
    assert [(name, stage) for name, stage, _ in launched] == first
    return d / "sweep", first


def test_variants_sharing_stage_0_train_it_once(swept):
    out, launched = swept
    assert launched == [("default", "nursery"), ("default", "primary"), ("clone-F0", "primary"),
                        ("gstack", "primary"), ("baseline", "baseline")]
    rec = json.loads((out / "sweep.json").read_text())["variants"]
    assert rec["default"]["trained"] == ["nursery", "primary"] and rec["default"]["reused"] == {}
    for v in ("clone-F0", "gstack"):
        assert rec[v]["reused"] == {"nursery": "default"} and rec[v]["trained"] == ["primary"]
        # the very files (weights, moments, result, metrics): hard links, no copies; the checkpoints
        # stay with the stage that trained
        src = out / "default/stages/00_nursery"
        files = [f.relative_to(src) for f in src.rglob("*") if f.is_file() and "checkpoints" not in f.parts]
        assert len(files) >= 4
        for f in files:
            assert os.path.samefile(out / v / "stages/00_nursery" / f, src / f), f
        assert not (out / v / "stages/00_nursery/checkpoints").exists()
        assert os.path.samefile(out / v / "tokenizer.json", out / "default/tokenizer.json")
        summary = json.loads((out / v / "summary.json").read_text())
        assert [s["status"] for s in summary["stages"]] == ["done", "done"]


def test_growth_operators_and_compute_in_real_stages(swept):
    out, _ = swept
    growth = {v: json.loads((out / v / "stages/01_primary/growth.json").read_text()) for v in
              ("default", "clone-F0", "gstack")}
    for v in ("default", "clone-F0"):  # exact on the stage's held-out set, in the trainer's own model
        assert abs(growth[v]["loss_after_growth"] - growth[v]["loss_prev_model"]) <= 1e-5, v
        assert growth[v]["function_preserving"] is True
    assert growth["gstack"]["function_preserving"] is False
    result = json.loads((out / "gstack/stages/01_primary/result.json").read_text())
    assert result["growth"] == {"depth": "gstack", "init": "mirror", "function_preserving": False}
    # F = 0: the frozen generation counts 4·N·T, and the run's count is the hand formula's
    cfg = RD.load_run_config(out / "clone-F0")
    layout = Plan(cfg, 320).layout(1)
    r = json.loads((out / "clone-F0/stages/01_primary/result.json").read_text())
    assert r["flops"] == pytest.approx(flops_per_token(layout, 32, {0: 0.0, 1: 1.0}) * r["tokens"], rel=1e-12)
    assert r["flops"] < flops_per_token(layout, 32) * r["tokens"]
    assert r["eval_flops"] > 0 and r["growth_check_flops"] > 0
    assert r["generations"][0]["drift"] == 0.0  # frozen: its grown values stay as they are


def test_table_and_figure(swept):
    out, _ = swept
    rows = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert set(rows) == {"default", "clone-F0", "gstack"}
    for r in rows.values():
        assert r["done"] and set(r["final_losses"]) == {"nursery", "primary"}
        assert r["ratio_final"]["target"] == r["final_losses"]["primary"]
        assert r["ratio_mean"]["target"] == pytest.approx(sum(r["final_losses"].values()) / 2)
        assert set(r["pairs"]) == {"pairs.jsonl"} and set(r["drift"]) == {"nursery"}
        # the figure's curves: the final model is the curve's last point, the mean set's too
        assert r["curve_final"][-1] == pytest.approx([r["flops"], r["final_losses"]["primary"]])
        assert r["curve_mean"][-1] == pytest.approx([r["flops"], r["ratio_mean"]["target"]])
        assert len(r["curve_mean"]) == 2  # both stage ends scored both sets
    md = (out / "sweep.md").read_text()
    assert "| ratio (final set) | ratio (mean set) | loss nursery | loss primary | loss mean | pairs.jsonl |" in md
    assert "clone-F0: HyperCloning width" in md.replace("`", "")
    assert "| gstack (growth into primary not function-preserving) |" in md
    assert "| default |" in md
    assert (out / "sweep.png").stat().st_size > 10_000


def test_bad_sweep_files_are_refused_before_any_compute(tmp_path):
    def err(sweep):
        with pytest.raises(SW.SweepError) as e:
            SW.load_sweep(write_sweep(tmp_path, sweep))
        return str(e.value)

    assert "unknown key(s) varients" in err({"config": "cfg.yaml", "varients": []})
    assert "variants: expected a non-empty list" in err({"config": "cfg.yaml", "variants": []})
    assert "variants[1] (a).name: used twice" in err({"config": "cfg.yaml", "variants": [{"name": "a"}, {"name": "a"}]})
    assert "baseline: 'x' is not a variant" in err({"config": "cfg.yaml", "baseline": "x", "variants": [{"name": "a"}]})
    msg = err({"config": "cfg.yaml", "variants": [
        {"name": "odd", "set": {"stages.primary.growth.init": "clone", "stages.primary.model.ffn": 100}}]})
    assert "variants[0] (odd)" in msg and "model.ffn: 64 -> 100: growth.init clone needs integer width multiples" in msg
    assert not (tmp_path / "sweep").exists()


def test_stage_keys_follow_the_prefix(tmp_path):
    sw = SW.load_sweep(write_sweep(tmp_path, {"config": "cfg.yaml", "variants": [
        {"name": "a"}, {"name": "b", "set": {"stages.primary.freeze": 0.8}},
        {"name": "c", "set": {"stages.nursery.train.lr": 1e-3}},
        {"name": "d", "set": {"stages.primary.data": [{"path": "synthetic:level2"}]}}]}))
    a, b, c, d = (SW.stage_keys(v.cfg) for v in sw.variants)
    assert a[0] == b[0] and a[1] != b[1]  # F of stage 1 leaves stage 0 shared
    assert a[0] != c[0]  # stage 0's own config
    assert a[0] != d[0]  # other data: another tokenizer, so nothing is shared


def test_mean_ratio_interpolates_the_baseline_mean_curve():
    from llmagogy_ds.evidence.runs import Baseline, Curriculum, Stage, mean_comparison

    heldout = {"a": {"loss": 2.5}, "b": {"loss": 9.0}}  # b: the final stage's own loss_end wins
    cur = Curriculum(Path("."), "c", [Stage(0, "a", {"flops": 10.0, "loss_end": 3.0}, None, 0.0),
                                      Stage(1, "b", {"flops": 30.0, "loss_end": 2.0, "eval": {"heldout": heldout}},
                                            None, 10.0)], 2)
    evals = [{"cumulative_flops": 20.0, "heldout_loss/a": 3.0, "heldout_loss/b": 3.0},
             {"cumulative_flops": 60.0, "heldout_loss/a": 2.0, "heldout_loss/b": 2.0},
             {"cumulative_flops": 70.0, "heldout_loss/a": 1.0}]  # not every set scored: left out
    m = mean_comparison(cur, Baseline(Path("."), ["a", "b"], {"flops": 80.0}, None, evals, []))
    assert m["target"] == 2.25 and m["reached"] and m["baseline_best"] == 2.0
    assert m["flops_to_target"] == pytest.approx(50.0) and m["ratio"] == pytest.approx(50.0 / 40.0)
    del heldout["a"]  # the final model not scored on every set: no target
    assert mean_comparison(cur, Baseline(Path("."), ["a", "b"], {"flops": 80.0}, None, evals, []))["target"] is None
