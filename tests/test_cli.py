"""Tests for the ``llmagogy`` command line and the run directory (in-process, no training)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from llmagogy_ds.data import prepare as DP
from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.cluster import launcher
from llmagogy_ds.config import config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BASE = {
    "run": {"name": "clitest", "seed": 1},
    "tokenizer": {"vocab_size": 320},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32}, "train": {"micro_batch": 2, "nproc": 1}},
    "stages": [
        {"name": "nursery", "data": [{"path": "synthetic:level0"}],
         "model": {"layers": 2, "hidden": 64, "heads": 4, "ffn": 176}, "train": {"tokens": 10000}},
        {"name": "primary", "data": [{"path": "synthetic:level1"}, {"path": "synthetic:level0", "weight": 0.2}],
         "model": {"layers": 4, "hidden": 96, "heads": 6, "ffn": 256}, "train": {"tokens": 20000},
         "growth": {"depth": "identity", "placement": "interleave"}, "freeze": 0.5},
    ],
}


def base() -> dict:
    return copy.deepcopy(BASE)


def write_cfg(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


@pytest.fixture
def no_compute(monkeypatch, tmp_path):
    """Nothing may tokenize or train: any call fails the test (not caught by the CLI)."""
    calls = []

    def forbidden(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return f

    monkeypatch.setattr(DP, "prepare_data", forbidden("prepare_data"))
    monkeypatch.setattr(launcher, "run_stage", forbidden("run_stage"))
    monkeypatch.chdir(tmp_path)  # the default run dir (runs/<name>) would land here
    return calls


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_nothing_written(tmp_path: Path, run_dir: Path):
    assert not run_dir.exists()
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- invalid configs
def _unknown_key(raw, tmp_path):
    raw["stages"][1]["train"]["lrr"] = 1e-3
    return ["stages[1] (primary).train.lrr", "did you mean 'lr'"]


def _shrinking_hidden(raw, tmp_path):
    raw["stages"][1]["model"].update(hidden=48, heads=3)
    return ["stages[1] (primary).model.hidden", "shrinks from 64 to 48"]


def _freeze_too_big(raw, tmp_path):
    raw["stages"][1]["freeze"] = 1.5
    return ["stages[1] (primary).freeze.value", "1.5"]


def _missing_data_file(raw, tmp_path):
    raw["stages"][0]["data"] = [{"path": "corpora/missing.txt"}]
    return ["stages[0] (nursery).data[0].path", "missing.txt"]


@pytest.mark.parametrize("breaker", [_unknown_key, _shrinking_hidden, _freeze_too_big, _missing_data_file])
def test_run_invalid_config_fails_before_anything(tmp_path, capsys, no_compute, breaker):
    raw = base()
    expected = breaker(raw, tmp_path)
    cfg = write_cfg(tmp_path, raw)
    run_dir = tmp_path / "run"
    rc, out, err = run_cli(["run", str(cfg), "--run-dir", str(run_dir)], capsys)
    assert rc == 2
    assert "ConfigError" in err
    for text in expected:
        assert text in err
    assert_nothing_written(tmp_path, run_dir)
    assert no_compute == []
    # `validate` says the same
    rc, _, err2 = run_cli(["validate", str(cfg)], capsys)
    assert rc == 2 and expected[0] in err2


def test_run_reports_all_errors_at_once(tmp_path, capsys, no_compute):
    raw = base()
    _unknown_key(raw, tmp_path)
    _freeze_too_big(raw, tmp_path)
    rc, _, err = run_cli(["run", str(write_cfg(tmp_path, raw)), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and "lrr" in err and "freeze.value" in err


def test_bad_override_is_refused(tmp_path, capsys, no_compute):
    cfg = write_cfg(tmp_path, base())
    rc, _, err = run_cli(["run", str(cfg), "--run-dir", str(tmp_path / "run"),
                          "--set", "stages.nope.train.lr=1"], capsys)
    assert rc == 2 and "'nope'" in err
    assert_nothing_written(tmp_path, tmp_path / "run")


def test_unknown_stage(tmp_path, capsys, no_compute):
    cfg = write_cfg(tmp_path, base())
    run_dir = tmp_path / "run"
    rc, _, err = run_cli(["run", str(cfg), "--run-dir", str(run_dir), "--stage", "NOPE"], capsys)
    assert rc == 2
    assert "'NOPE'" in err and "nursery" in err and "primary" in err
    assert_nothing_written(tmp_path, run_dir)


def test_missing_config_file(tmp_path, capsys, no_compute):
    rc, _, err = run_cli(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and "nope.yaml" in err and "not found" in err


# --------------------------------------------------------------------------- validate
def test_validate_tiny(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["validate", str(CONFIGS / "tiny.yaml")], capsys)
    assert rc == 0, err
    assert "OK (3 stages)" in out
    assert list(tmp_path.iterdir()) == []  # validate writes nothing


def test_validate_with_override(capsys, tmp_path):
    cfg = write_cfg(tmp_path, base())
    rc, _, err = run_cli(["validate", str(cfg), "--set", "stages.primary.train.lr=1e-3"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["validate", str(cfg), "--set", "stages.primary.train.lr=-1"], capsys)
    assert rc == 2 and "stages[1] (primary).train.lr" in err


# --------------------------------------------------------------------------- run dir
def make_cfg(tmp_path: Path, **train):
    raw = base()
    raw["stages"][1]["train"].update(train)
    return config_from_dict(raw, tmp_path)


def test_open_run_dir_creates_frozen_config(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = RD.open_run_dir(cfg, tmp_path / "run")
    frozen = run_dir / "config.yaml"
    assert frozen.read_text() == cfg.to_yaml()
    # the frozen copy reloads to the same config (what a resumed run compares against)
    again = RD.load_run_config(run_dir)
    assert again.to_yaml() == cfg.to_yaml()
    assert [s.name for s in again.stages] == ["nursery", "primary"]
    assert again.stages[1].freeze.value == 0.5
    # same config: accepted, nothing rewritten
    mtime = frozen.stat().st_mtime_ns
    (run_dir / "marker").write_text("x")
    assert RD.open_run_dir(again, run_dir) == run_dir
    assert RD.open_run_dir(make_cfg(tmp_path), run_dir) == run_dir
    assert frozen.stat().st_mtime_ns == mtime and (run_dir / "marker").exists()


def test_open_run_dir_refuses_other_config(tmp_path):
    run_dir = RD.open_run_dir(make_cfg(tmp_path), tmp_path / "run")
    (run_dir / "marker").write_text("x")
    other = make_cfg(tmp_path, lr=0.0123)
    with pytest.raises(RD.RunDirError) as e:
        RD.open_run_dir(other, run_dir)
    msg = str(e.value)
    assert "--restart" in msg
    assert "lr: 0.0123" in msg  # the differing key, as a diff line
    assert "+" in msg and "-" in msg
    assert (run_dir / "config.yaml").read_text() == make_cfg(tmp_path).to_yaml()  # untouched
    assert (run_dir / "marker").exists()


def test_open_run_dir_restart_moves_old_run_aside(tmp_path, capsys):
    old_cfg, new_cfg = make_cfg(tmp_path), make_cfg(tmp_path, lr=0.0123)
    run_dir = RD.open_run_dir(old_cfg, tmp_path / "run")
    (run_dir / "marker").write_text("old run")
    RD.open_run_dir(new_cfg, run_dir, restart=True)
    asides = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(asides) == 1
    aside = asides[0]
    assert (aside / "marker").read_text() == "old run"  # nothing deleted
    assert (aside / "config.yaml").read_text() == old_cfg.to_yaml()
    assert (run_dir / "config.yaml").read_text() == new_cfg.to_yaml()
    assert not (run_dir / "marker").exists()  # a fresh run dir
    assert str(aside) in capsys.readouterr().out
    # the new config is accepted again; restart with the same config moves nothing
    RD.open_run_dir(new_cfg, run_dir)
    RD.open_run_dir(new_cfg, run_dir, restart=True)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 1


def test_open_run_dir_restart_twice_quickly(tmp_path):
    a, b = make_cfg(tmp_path), make_cfg(tmp_path, lr=0.0123)
    run_dir = RD.open_run_dir(a, tmp_path / "run")
    RD.open_run_dir(b, run_dir, restart=True)
    RD.open_run_dir(a, run_dir, restart=True)  # within the same second: the aside names must not collide
    asides = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run.old-"))
    assert len(asides) == 2
    assert {(p / "config.yaml").read_text() for p in asides} == {a.to_yaml(), b.to_yaml()}
    assert (run_dir / "config.yaml").read_text() == a.to_yaml()


def test_cli_run_refuses_changed_config_then_restart(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = []
    monkeypatch.setattr(DP, "prepare_data", lambda cfg, run_dir: prepared.append(run_dir))
    monkeypatch.setattr(launcher, "run_stage", lambda run_dir, name, nproc, extra: 0)  # a stage that stops early
    cfg = write_cfg(tmp_path, base())
    run_dir = tmp_path / "run"
    rc, out, err = run_cli(["run", str(cfg), "--run-dir", str(run_dir)], capsys)
    assert rc == 0, err
    assert "stopped before its end" in out
    assert (run_dir / "config.yaml").exists() and prepared == [run_dir]

    changed = ["run", str(cfg), "--run-dir", str(run_dir), "--set", "stages.primary.train.lr=0.0123"]
    rc, _, err = run_cli(changed, capsys)
    assert rc == 2
    assert "--restart" in err and "lr: 0.0123" in err
    assert len(prepared) == 1  # refused before any data preparation

    rc, out, err = run_cli(changed + ["--restart"], capsys)
    assert rc == 0, err
    assert "moved the previous run" in out
    assert load_config(run_dir / "config.yaml").stages[1].train.lr == 0.0123
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 1


def test_cli_run_failed_stage_returns_its_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(DP, "prepare_data", lambda cfg, run_dir: None)

    def run_stage(run_dir, name, nproc, extra):
        started.append((name, nproc))
        return 3

    monkeypatch.setattr(launcher, "run_stage", run_stage)
    cfg = write_cfg(tmp_path, base())
    rc, _, err = run_cli(["run", str(cfg), "--run-dir", str(tmp_path / "run"), "--stage", "primary"], capsys)
    assert rc == 3
    assert started == [("primary", 1)]  # only the requested stage
    assert "primary failed (exit 3)" in err and "resume" in err


def test_plan_command_on_the_example_config(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "configs/example-1b.yaml", "--no-check-files", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "university" in text and "GPU-h" in text
    plans = json.loads(out.read_text())
    assert len(plans) == 16 and 0.9e9 < plans[-2]["n_params"] < 1.1e9 and "final" in text


def test_plan_flags_a_stage_that_does_not_fit(capsys):
    rc = cli.main(["plan", "configs/example-1b.yaml", "--no-check-files", "--gpu", "a100-40",
               "--set", "stages.university.train.zero_stage=0", "--set", "stages.university.train.micro_batch=32"])
    assert rc == 1
    assert "will not fit" in capsys.readouterr().out


def test_eval_command_names_a_missing_run(capsys, tmp_path):
    assert cli.main(["eval", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
