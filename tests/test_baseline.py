"""The `eval:` and `baseline:` config sections, the derived baseline config, and one real tiny
curriculum + baseline + report, trained in this process (1 rank, no torchrun start-up)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from llmagogy_ds.data import prepare as DP
from llmagogy_ds.evidence import baseline as B
from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.model.stages import Plan
from llmagogy_ds.config import ConfigError, config_from_dict
from llmagogy_ds.data.corpus import file_sha
from llmagogy_ds.model.flops import flops_per_token
from conftest import stages_in_process

VOCAB = 320

BASE = {
    "run": {"name": "bl", "seed": 3},
    "tokenizer": {"vocab_size": VOCAB},
    "wandb": {"mode": "disabled"},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32},
                 "train": {"micro_batch": 4, "nproc": 1, "zero_stage": 0, "lr": 3e-3, "warmup_steps": 4,
                           "eval_every": 16, "eval_tokens": 1024, "checkpoint_every": 1000, "log_every": 8,
                           "weight_decay": 0.0}},
    "stages": [
        {"name": "nursery", "data": [{"path": "synthetic:level0"}],
         "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}, "train": {"tokens": 6144}},
        {"name": "primary", "data": [{"path": "synthetic:level1"}, {"path": "synthetic:level0", "weight": 0.25}],
         "model": {"layers": 2, "hidden": 48, "heads": 3, "ffn": 96}, "train": {"tokens": 6144},
         "growth": {"depth": "identity", "placement": "interleave"}, "freeze": 0.5},
    ],
}


def base() -> dict:
    return copy.deepcopy(BASE)


def errors_of(raw: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, tmp_path)
    return str(e.value)


# --------------------------------------------------------------------------- config sections
def test_eval_section_resolves_paths_and_names_bad_keys(tmp_path):
    (tmp_path / "mc.jsonl").write_text('{"question": "1 + 1 =", "choices": ["2", "3"], "answer": 0}\n')
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "a.jsonl").write_text('{"sentence_good": "a b", "sentence_bad": "b a"}\n')
    raw = base()
    raw["eval"] = {"exams": ["mc.jsonl"], "pairs": "pairs", "every_stage": True}
    cfg = config_from_dict(raw, tmp_path)
    assert cfg.eval.exams == [str(tmp_path / "mc.jsonl")] and cfg.eval.pairs == [str(tmp_path / "pairs")]
    assert cfg.eval.texts == [] and cfg.eval.every_stage
    # the frozen copy keeps absolute paths, so it reloads from anywhere
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()), "/")
    assert again.eval == cfg.eval
    assert config_from_dict(base(), tmp_path).eval is None  # no section: no stage-end scoring

    raw["eval"] = {"exams": ["nope.jsonl"], "texts": [3], "every_stage": "often", "exam": []}
    msg = errors_of(raw, tmp_path)
    assert f"eval.exams[0]: no such file or directory: {tmp_path / 'nope.jsonl'}" in msg
    assert "eval.texts: expected a list of text file paths" in msg
    assert "eval.every_stage: expected true or false" in msg
    assert "eval.exam: unknown key 'exam' (did you mean 'exams'?)" in msg


def test_baseline_section_is_checked_against_the_final_train_block(tmp_path):
    raw = base()
    raw["baseline"] = {"compute_factor": 2, "train": {"lr": 1e-3, "nproc": 1}}
    cfg = config_from_dict(raw, tmp_path)
    assert cfg.baseline.compute_factor == 2.0 and cfg.baseline.tokens is None and cfg.baseline.data is None
    assert cfg.baseline.train.lr == 1e-3 and cfg.baseline.train.micro_batch == 4  # the rest: the final stage's
    raw["baseline"] = {"compute_factor": 0.5, "tokens": 100, "data": [], "train": {"tokens": 5, "lrr": 1}}
    msg = errors_of(raw, tmp_path)
    for text in ("baseline.compute_factor: must be >= 1", "baseline: set at most one of tokens or compute_factor",
                 "baseline.data: missing or empty data", "baseline.train.tokens: the baseline's length is set by",
                 "baseline.train.lrr: unknown key 'lrr' (did you mean 'lr'?)"):
        assert text in msg


# --------------------------------------------------------------------------- derived config
def three_stages() -> dict:
    raw = base()
    raw["stages"].append({"name": "middle", "data": [{"path": "synthetic:level2"}, {"path": "synthetic:level1",
                                                                                      "weight": 0.5}],
                          "model": {"layers": 3, "hidden": 64, "heads": 4, "ffn": 128}, "train": {"tokens": 9000},
                          "growth": {"depth": "stack"}, "freeze": 0.25})
    return raw


def budgets_of(cfg) -> list[B.StageBudget]:
    plan = Plan(cfg, VOCAB)
    return [B.stage_budget(st, plan.layout(s)) for s, st in enumerate(cfg.stages)]


def test_derived_baseline_has_the_final_architecture_all_corpora_and_the_compute(tmp_path):
    cfg = config_from_dict(three_stages(), tmp_path)
    budgets = budgets_of(cfg)
    # train.py's counting: whole steps of 4 sequences x 32 tokens = 128 tokens
    assert [b.tokens for b in budgets] == [6144, 6144, 9088] and [b.steps for b in budgets] == [48, 48, 71]
    derived, info = B.derive_config(cfg, VOCAB, budgets)
    assert len(derived.stages) == 1
    st, final = derived.stages[0], cfg.stages[-1]
    assert st.model == final.model  # the final stage's shape, trained from scratch
    assert Plan(derived, VOCAB).multipliers(0) == {0: 1.0}  # one generation: nothing slowed or frozen
    # every corpus, weighted by the tokens the curriculum spends on it (a stage's split by its weights)
    level0 = 6144 + 6144 * 0.25 / 1.25
    level1 = 6144 * 1 / 1.25 + 9088 * 0.5 / 1.5
    level2 = 9088 * 1 / 1.5
    total = level0 + level1 + level2
    got = {s.path: s.weight for s in st.data}
    assert got == pytest.approx({"synthetic:level0": level0 / total, "synthetic:level1": level1 / total,
                                 "synthetic:level2": level2 / total}, abs=1e-6)
    # the final stage's optimizer and schedule; only the length differs
    for key in ("lr", "warmup_steps", "schedule", "min_lr_ratio", "beta1", "beta2", "weight_decay", "micro_batch"):
        assert getattr(st.train, key) == getattr(final.train, key), key
    curriculum = sum(b.flops for b in budgets)
    assert info["curriculum_flops"] == curriculum
    fpt = flops_per_token(Plan(derived, VOCAB).layout(0), 32)
    assert fpt == flops_per_token(Plan(cfg, VOCAB).layout(2), 32)  # grown or fresh: the same FLOPs per token
    steps = st.train.tokens // 128
    assert st.train.tokens % 128 == 0 and info["baseline_flops"] == steps * 128 * fpt
    assert curriculum <= info["baseline_flops"] < curriculum + 128 * fpt  # at least, and by less than one step
    assert derived.run.seed == cfg.run.seed  # the same synthetic corpora


def test_baseline_section_overrides(tmp_path):
    raw = three_stages()
    raw["baseline"] = {"compute_factor": 2.0, "data": [{"path": "synthetic:level2"}], "train": {"lr": 1e-3}}
    cfg = config_from_dict(raw, tmp_path)
    budgets = budgets_of(cfg)
    derived, info = B.derive_config(cfg, VOCAB, budgets)
    st = derived.stages[0]
    assert [s.path for s in st.data] == ["synthetic:level2"] and st.train.lr == 1e-3
    assert info["baseline_flops"] >= 2 * info["curriculum_flops"]
    raw["baseline"] = {"tokens": 1000}
    cfg = config_from_dict(raw, tmp_path)
    with pytest.raises(ConfigError, match=r"baseline.tokens: 1,000 tokens are .* less than the curriculum's"):
        B.derive_config(cfg, VOCAB, budgets)
    raw["baseline"] = {"tokens": 10**6}
    derived, info = B.derive_config(config_from_dict(raw, tmp_path), VOCAB, budgets)
    assert derived.stages[0].train.tokens == 10**6 // 128 * 128 + 128


def test_epochs_budget_counts_like_the_trainer(tmp_path):
    raw = base()
    raw["stages"][0]["train"] = {"epochs": 1.5}
    cfg = config_from_dict(raw, tmp_path)

    class Data:  # the packed sizes are all stage_budget reads
        sources = [{"train_tokens": 1000}, {"train_tokens": 65}]

    b = B.stage_budget(cfg.stages[0], Plan(cfg, VOCAB).layout(0), Data())
    windows = 999 // 32 + 64 // 32  # train.py: (len(stream) - 1) // seq per source
    assert b.tokens == -(-int(1.5 * windows * 32) // 128) * 128
    with pytest.raises(ValueError, match="epochs needs the stage's packed data"):
        B.stage_budget(cfg.stages[0], Plan(cfg, VOCAB).layout(0))


def test_longer_earlier_sequences_are_refused(tmp_path):
    raw = base()
    raw["stages"][0]["model"]["seq_len"] = 64
    cfg = config_from_dict(raw, tmp_path)
    with pytest.raises(ConfigError, match=r"nursery.*seq_len: 64 is longer than the final stage's 32"):
        B.derive_config(cfg, VOCAB, budgets_of(cfg))


def test_curriculum_run_must_come_from_the_same_config(tmp_path):
    cfg = config_from_dict(base(), tmp_path)
    run = RD.open_run_dir(cfg, tmp_path / "run")
    raw = base()
    raw["eval"] = {}  # what may differ: eval, baseline, wandb, resources
    raw["baseline"] = {"train": {"nproc": 2}}
    raw["stages"][1]["resources"] = {"nodes": 2}
    assert B.check_same_curriculum(config_from_dict(raw, tmp_path), run).run.name == "bl"
    raw["stages"][1]["train"]["tokens"] = 9999
    with pytest.raises(RD.RunDirError, match="trained from another config") as e:
        B.check_same_curriculum(config_from_dict(raw, tmp_path), run)
    assert "9999" in str(e.value)


def test_baseline_command_refuses_a_bad_config_before_any_compute(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DP, "prepare_data", lambda *a: pytest.fail("prepared data"))
    raw = base()
    raw["baseline"] = {"compute_factor": 0.5}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    assert cli.main(["baseline", str(cfg_file), "--run-dir", str(tmp_path / "b")]) == 2
    assert "baseline.compute_factor: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def runs(tmp_path_factory, dist_world1):
    """A 2-stage curriculum with an `eval:` section, then its baseline, trained in this process."""
    d = tmp_path_factory.mktemp("bl")
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"question": "3 + 4 =", "choices": ["7", "8", "5"], "answer": 0, "grade": 1},
        {"question": "6 * 2 =", "choices": ["10", "12"], "answer": 1, "grade": 2},
        {"question": "count: 4 5 6", "choices": ["7", "3"], "answer": 0, "grade": 1}]))
    (d / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"sentence_good": "count: 1 2 3 4", "sentence_bad": "count: 1 3 2 4", "UID": "order"},
        {"sentence_good": "the dog is big.", "sentence_bad": "dog the is big.", "UID": "syntax"}]))
    (d / "text.txt").write_text("a cat is red.\n\n5 + 3 = 8\n")
    raw = base()
    raw["eval"] = {"exams": ["mc.jsonl"], "pairs": ["pairs.jsonl"], "texts": ["text.txt"]}
    cfg_file = d / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    with stages_in_process() as launched:
        assert cli.main(["run", str(cfg_file), "--run-dir", str(d / "cur")]) == 0
        assert cli.main(["baseline", str(cfg_file), "--curriculum", str(d / "cur"), "--run-dir", str(d / "base")]) == 0
    assert launched == [("cur", "nursery", 1), ("cur", "primary", 1), ("base", "baseline", 1)]
    return d


def test_stage_end_eval_lands_in_summary(runs):
    summary = json.loads((runs / "cur" / "summary.json").read_text())
    for st in summary["stages"]:
        ev = st["eval"]
        assert set(ev["heldout"]) == {"nursery", "primary"}  # every stage's held-out set, at every stage end
        # the eval scores exactly the trainer's held-out windows
        assert ev["heldout"][st["name"]]["loss"] == pytest.approx(st["loss_end"], abs=1e-5)
        assert ev["heldout"][st["name"]]["bpb"] > 0
        assert ev["exams"][str(runs / "mc.jsonl")]["n"] == 3 and set(ev["exams"][str(runs / "mc.jsonl")]["by_grade"]) \
            == {"1", "2"}
        assert ev["pairs"][str(runs / "pairs.jsonl")]["n"] == 2
        assert ev["texts"][str(runs / "text.txt")]["bytes"] == len("a cat is red.") + len("5 + 3 = 8")
        assert (runs / "cur" / "stages" / f"{st['index']:02d}_{st['name']}" / "eval.json").exists()


def test_baseline_trains_the_final_architecture_at_the_curriculum_compute(runs):
    cur = json.loads((runs / "cur" / "summary.json").read_text())
    base = json.loads((runs / "base" / "summary.json").read_text())["stages"][0]
    final = cur["stages"][-1]
    assert (base["layers"], base["hidden"], base["heads"], base["ffn"]) == \
        (final["layers"], final["hidden"], final["heads"], final["ffn"])
    assert [g["generation"] for g in base["generations"]] == [0] and base["generations"][0]["multiplier"] == 1.0
    assert base["flops"] >= cur["total_flops"]
    assert set(base["epochs"]) == {"synthetic:level0", "synthetic:level1"}  # all corpora
    info = json.loads((runs / "base" / "baseline.json").read_text())
    assert info["curriculum_flops"] == pytest.approx(cur["total_flops"], rel=1e-12)
    # comparable held-out sets: the same tokenizer and the same packed data (cache fingerprints)
    assert file_sha(runs / "base" / "tokenizer.json") == file_sha(runs / "cur" / "tokenizer.json")
    for name in ("nursery", "primary"):
        assert len(list((runs / "base" / "data").glob(f"{name}-*"))) == 1
        ours, theirs = (next((runs / r / "data").glob(f"{name}-*")).name for r in ("base", "cur"))
        assert ours == theirs
    # held-out loss on every curriculum stage's set at every eval, against cumulative FLOPs
    metrics = (runs / "base" / "stages" / "00_baseline" / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, metrics) if "heldout_loss" in r]
    assert len(evals) >= 3 and all("heldout_loss/nursery" in r and "heldout_loss/primary" in r for r in evals)
    assert evals[-1]["cumulative_flops"] == pytest.approx(base["flops"])
    # the trainer's per-set loss and the stage-end eval of the same windows agree
    assert base["eval"]["heldout"]["primary"]["loss"] == pytest.approx(evals[-1]["heldout_loss/primary"], abs=1e-5)


def test_config_count_of_the_curriculum_compute_matches_the_run(runs):
    from llmagogy_ds.config import load_config
    from llmagogy_ds.data.corpus import load_tokenizer

    cfg = load_config(runs / "cfg.yaml")
    tok = load_tokenizer(runs / "cur" / "tokenizer.json")
    budgets = B.budgets_from_config(cfg, runs / "cur", tok, file_sha(runs / "cur" / "tokenizer.json"))
    summary = json.loads((runs / "cur" / "summary.json").read_text())
    assert [b.tokens for b in budgets] == [s["tokens"] for s in summary["stages"]]
    assert sum(b.flops for b in budgets) == pytest.approx(summary["total_flops"], rel=1e-12)


def test_baseline_rerun_is_done_and_another_config_is_refused(runs, capsys):
    rc = cli.main(["baseline", str(runs / "cfg.yaml"), "--curriculum", str(runs / "cur"),
                   "--run-dir", str(runs / "base")])
    out = capsys.readouterr().out
    assert rc == 0 and "done" in out and "FLOPs-to-target ratio" in out
    rc = cli.main(["baseline", str(runs / "cfg.yaml"), "--run-dir", str(runs / "base"),
                   "--set", "stages.primary.train.tokens=7000"])
    assert rc == 2 and "holds a baseline of another curriculum config" in capsys.readouterr().err


def test_report_of_the_real_runs(runs, capsys):
    out = runs / "report"
    assert cli.main(["report", str(runs / "cur"), "--baseline", str(runs / "base"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for png in ("loss_vs_flops", "curriculum_vs_baseline", "exams", "generations"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        assert f"({png}.png)" in md
    assert "FLOPs-to-target ratio" in md and "pairs.jsonl" in md and "mc.jsonl" in md


def test_run_baseline_is_an_alias(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DP, "prepare_data", lambda *a: pytest.fail("prepared data"))
    raw = base()
    raw["baseline"] = {"compute_factor": 0.5}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(cfg_file), "--baseline", "--run-dir", str(tmp_path / "b")]) == 2
    assert "baseline.compute_factor: must be >= 1" in capsys.readouterr().err  # went the baseline's way
    assert cli.main(["run", str(cfg_file), "--baseline", "--stage", "nursery"]) == 2
    assert "leave out --stage with --baseline" in capsys.readouterr().err
