"""Every failure is a clear message and loses nothing (issue 13, items 2-6): a failed preparation
does not freeze its config; names cannot escape the run directory or be read as options; what
the trainer needs of the data is checked in `prepare`; bad inputs give one message naming the
file and the reason, never a traceback (`--debug` shows it); the dry-run script quotes every
argument. Small local corpora, no training."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.cluster import launcher
from llmagogy_ds.cluster import slurm as S
from llmagogy_ds.config import config_from_dict, load_config
from llmagogy_ds.data import prepare as DP

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SEQ = 16


def text(n_docs: int, words: int = 30) -> str:
    return "\n\n".join(f"document {i}: " + " ".join(f"w{(i * 7 + j) % 40}" for j in range(words))
                       for i in range(n_docs))


def raw_cfg(data: list | None = None, **top) -> dict:
    raw = {"run": {"name": "errs", "seed": 1}, "tokenizer": {"vocab_size": 300},
           "defaults": {"model": {"head_dim": 16, "seq_len": SEQ},
                        "train": {"micro_batch": 2, "nproc": 1, "tokens": 1000}},
           "stages": [{"name": "one", "data": data or [{"path": "train.txt"}],
                       "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}}]}
    raw.update(top)
    return raw


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A directory with a good corpus (train.txt), the current directory; nothing may train."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text(text(60))
    monkeypatch.setattr(launcher, "run_stage", lambda *a: pytest.fail("a stage was started"))
    return tmp_path


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def llmagogy(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_message(rc, err, *fragments):
    """Exit 2, one `llmagogy:` line (a few with a diff) naming the file and the reason, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("llmagogy:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in err, (f, err)


# =========================================================================== 2. a failed prepare
def test_fixed_config_after_failed_prepare_runs_without_restart(work, capsys):
    (work / "blank.txt").write_text("   \n\n  \n")
    bad = write(work / "cfg.yaml", raw_cfg([{"path": "blank.txt"}]))
    rc, _, err = llmagogy(["prepare", bad, "--run-dir", "run"], capsys)
    assert_one_message(rc, err, "blank.txt", "no train documents")
    assert (work / "run" / RD.UNPREPARED).exists()
    good = write(work / "cfg.yaml", raw_cfg())  # the fix: the same command again, no --restart
    rc, out, err = llmagogy(["prepare", good, "--run-dir", "run"], capsys)
    assert rc == 0, err
    assert "never prepared successfully; replacing it" in err
    assert RD.load_run_config(work / "run").stages[0].data[0].path == str(work / "train.txt")
    assert not (work / "run" / RD.UNPREPARED).exists()
    # prepared: from now on another config is refused, as before
    write(work / "cfg.yaml", raw_cfg(defaults={"model": {"head_dim": 16, "seq_len": 8},
                                               "train": {"micro_batch": 2, "nproc": 1, "tokens": 1000}}))
    rc, _, err = llmagogy(["prepare", work / "cfg.yaml", "--run-dir", "run"], capsys)
    assert_one_message(rc, err, "different config", "--restart", "seq_len: 8")


def test_a_started_stage_keeps_the_config_frozen(work, capsys):
    cfg = config_from_dict(raw_cfg(), work)
    RD.open_run_dir(cfg, work / "run", until_prepared=True)
    (RD.stage_dir(work / "run", cfg, 0)).mkdir(parents=True)
    (RD.stage_dir(work / "run", cfg, 0) / RD.INIT).write_bytes(b"weights")  # a stage started (an older version)
    other = config_from_dict(raw_cfg(tokenizer={"vocab_size": 320}), work)
    assert not RD.replaceable(work / "run")
    with pytest.raises(RD.RunDirError, match="different config"):
        RD.open_run_dir(other, work / "run", until_prepared=True)


def test_replacing_an_unprepared_config_drops_a_tokenizer_of_another_corpus(work):
    run = work / "run"
    a = config_from_dict(raw_cfg(), work)
    RD.open_run_dir(a, run, until_prepared=True)
    RD.tokenizer_path(run).write_text("{}")
    RD.open_run_dir(config_from_dict(raw_cfg(run={"name": "errs", "seed": 1}, wandb={"mode": "disabled"}), work),
                    run, until_prepared=True)  # the corpus is the same: the tokenizer stays
    assert RD.tokenizer_path(run).exists()
    (work / "more.txt").write_text(text(40))
    RD.open_run_dir(config_from_dict(raw_cfg([{"path": "more.txt"}]), work), run, until_prepared=True)
    assert not RD.tokenizer_path(run).exists()  # trained again from the new corpus


def test_submit_after_a_failed_job_prepare_replaces_the_config_and_a_dry_run_writes_nothing(work, capsys):
    run = work / "run"
    RD.open_run_dir(load_config(TINY), run, until_prepared=True)  # what submit does; the job's prepare failed
    frozen = (run / RD.CONFIG).read_text()
    argv = ["submit", TINY, "--run-dir", run, "--set", "stages.middle.train.lr=1e-4"]
    rc, out, err = llmagogy(argv + ["--dry-run"], capsys)
    assert rc == 0, err
    assert (run / RD.CONFIG).read_text() == frozen  # a dry run writes nothing
    assert (run / RD.UNPREPARED).exists()
    RD.mark_prepared(run)  # once a job's prepare succeeded, the same change is refused
    rc, _, err = llmagogy(argv + ["--dry-run"], capsys)
    assert_one_message(rc, err, "different config", "--restart")


def test_baseline_after_a_failed_prepare_takes_the_fixed_config(work, capsys):
    (work / "short.txt").write_text("tiny text")
    bad = write(work / "cfg.yaml", raw_cfg([{"path": "train.txt", "heldout": "short.txt"}]))
    rc, _, err = llmagogy(["baseline", bad, "--run-dir", "base", "--prepare-only"], capsys)
    assert_one_message(rc, err, "short.txt", "no held-out window")
    good = write(work / "cfg.yaml", raw_cfg())
    rc, out, err = llmagogy(["baseline", good, "--run-dir", "base", "--prepare-only"], capsys)
    assert rc == 0, err
    assert "never prepared successfully" in out and "baseline prepared" in out
    assert not (work / "base" / RD.UNPREPARED).exists()
    assert load_config(work / "base" / RD.CURRICULUM).stages[0].data[0].heldout is None


# =========================================================================== 3. names
@pytest.mark.parametrize("key,name", [("run", "."), ("run", ".."), ("run", "-x"), ("run", ".hidden"),
                                      ("stage", "-x"), ("stage", ".."), ("stage", "--stage"), ("stage", "a" * 101)])
def test_names_that_escape_or_read_as_options_are_refused_at_validation(work, capsys, key, name):
    raw = raw_cfg()
    if key == "run":
        raw["run"]["name"] = name
    else:
        raw["stages"][0]["name"] = name
    rc, _, err = llmagogy(["validate", write(work / "cfg.yaml", raw)], capsys)
    assert_one_message(rc, err, "ConfigError", f"{key}.name" if key == "run" else ".name")
    assert "must match" in err or "too long" in err


def test_a_run_dir_that_holds_something_else_is_refused(work, capsys):
    cfg = write(work / "cfg.yaml", raw_cfg())
    for run_dir in (".", work):  # the config's own folder
        rc, _, err = llmagogy(["prepare", cfg, "--run-dir", run_dir], capsys)
        assert_one_message(rc, err, "not empty and holds no run", "cfg.yaml")
    rc, _, err = llmagogy(["baseline", cfg, "--run-dir", ".", "--prepare-only"], capsys)
    assert_one_message(rc, err, "not empty and holds no run")
    assert not (work / RD.CONFIG).exists() and not (work / RD.CURRICULUM).exists()
    (work / "runs" / "other").mkdir(parents=True)  # runs/ itself (a run named "." before)
    rc, _, err = llmagogy(["prepare", cfg, "--run-dir", "runs"], capsys)
    assert_one_message(rc, err, "not empty and holds no run", "other")
    (work / "afile").write_text("x")
    rc, _, err = llmagogy(["prepare", cfg, "--run-dir", "afile"], capsys)
    assert_one_message(rc, err, "afile", "is a file")


def test_a_run_dir_with_a_size_search_before_the_run_is_a_run_dir(work):
    (work / "run" / "size_search" / "one").mkdir(parents=True)  # `llmagogy size-search` came first
    RD.open_run_dir(config_from_dict(raw_cfg(), work), work / "run", until_prepared=True)
    assert (work / "run" / RD.CONFIG).exists()


def test_restart_never_moves_the_current_directory_aside(work, capsys, monkeypatch):
    run = work / "run"
    RD.open_run_dir(config_from_dict(raw_cfg(), work), run)
    monkeypatch.chdir(run)
    with pytest.raises(RD.RunDirError, match="holds the current directory"):
        RD.open_run_dir(config_from_dict(raw_cfg(tokenizer={"vocab_size": 320}), work), Path("."), restart=True)
    assert run.is_dir() and not list(work.glob("run.old-*"))


# =========================================================================== 4. checked in prepare
def test_short_heldout_text_fails_in_prepare_naming_stage_and_file(work, capsys):
    (work / "short.txt").write_text("tiny text")
    cfg = write(work / "cfg.yaml", raw_cfg([{"path": "train.txt", "heldout": "short.txt"}]))
    rc, _, err = llmagogy(["validate", cfg], capsys)
    assert rc == 0, err  # only the tokens tell
    rc, out, err = llmagogy(["run", cfg, "--run-dir", "run"], capsys)  # no stage is started (fixture)
    assert_one_message(rc, err, "stage 'one'", "short.txt", "no held-out window", f"seq_len + 1 = {SEQ + 1}")
    assert not (work / "run" / RD.STAGES).exists()


def test_short_training_text_fails_in_prepare(work, capsys):
    (work / "small.txt").write_text("one two")
    (work / "held.txt").write_text(text(5))
    cfg = write(work / "cfg.yaml", raw_cfg([{"path": "train.txt"}, {"path": "small.txt", "heldout": "held.txt"}]))
    rc, _, err = llmagogy(["prepare", cfg, "--run-dir", "run"], capsys)
    assert_one_message(rc, err, "stage 'one'", "small.txt", "training text", "shorter than one sequence")


def test_one_short_heldout_source_is_a_warning_in_prepare(work, capsys):
    (work / "short.txt").write_text("tiny")
    (work / "b.txt").write_text(text(40))
    cfg = write(work / "cfg.yaml", raw_cfg([{"path": "train.txt"}, {"path": "b.txt", "heldout": "short.txt"}]))
    rc, out, err = llmagogy(["prepare", cfg, "--run-dir", "run"], capsys)
    assert rc == 0, err
    assert "warning: stage 'one': the held-out text of" in err and "short.txt" in err


def test_blank_eval_text_fails_in_prepare(work, capsys):
    (work / "blank.txt").write_text("\n  \n")
    cfg = write(work / "cfg.yaml", raw_cfg(eval={"texts": ["blank.txt"]}))
    rc, _, err = llmagogy(["prepare", cfg, "--run-dir", "run"], capsys)
    assert_one_message(rc, err, "blank.txt", "no text")


# =========================================================================== 5. one message per bad input
def _bad_source(name: str, content: bytes | None = None, field: str | None = None):
    def setup(work: Path) -> list:
        if content is None:  # a directory of empty .txt files
            (work / name).mkdir()
            for f in ("a.txt", "b.txt"):
                (work / name / f).write_text("")
        else:
            (work / name).write_bytes(content)
        src = {"path": name, **({"text_field": field} if field else {})}
        return ["prepare", write(work / "cfg.yaml", raw_cfg([src])), "--run-dir", "run"]
    return setup


def _tokenizer_not_a_tokenizer(work):
    (work / "tok.json").write_text("not json at all")
    return ["prepare", write(work / "cfg.yaml", raw_cfg(tokenizer={"path": "tok.json"})), "--run-dir", "run"]


def _summary_of_a_non_run_dir(work):
    return ["summary", work]


def _summary_torn(work):
    (work / "run").mkdir()
    (work / "run" / RD.SUMMARY).write_text('{"run": "x", "sta')
    return ["summary", work / "run"]


def _plan_json_unwritable(work):
    (work / "afile").write_text("x")
    return ["plan", write(work / "cfg.yaml", raw_cfg()), "--gpu", "cpu", "--json", work / "afile" / "plan.json"]


def _config_not_utf8(work):
    (work / "cfg.yaml").write_bytes(yaml.safe_dump(raw_cfg()).encode() + b"# caf\xe9\n")
    return ["validate", work / "cfg.yaml"]


def _mistyped_local_dir(work):
    (work / "mydata").mkdir()
    return ["validate", write(work / "cfg.yaml", raw_cfg([{"path": "mydata/train"}]))]


def _run_dir_is_a_file(work):
    (work / "run").write_text("x")
    return ["prepare", write(work / "cfg.yaml", raw_cfg()), "--run-dir", "run"]


def _status_torn_jobs(work):
    RD.open_run_dir(config_from_dict(raw_cfg(), work), work / "run")
    (work / "run" / RD.JOBS).write_text('[{"stage": ')
    return ["status", work / "run"]


BAD_INPUTS = {
    "jsonl text field is an int": (_bad_source("a.jsonl", b'{"text": "fine"}\n{"text": 5}\n'),
                                   ["a.jsonl", "record 2", "'text' is int"]),
    "malformed jsonl line": (_bad_source("b.jsonl", b'{"text": "a"}\n{"text": "b"}\n{bad\n'),
                             ["b.jsonl", "line 3", "bad JSON"]),
    "directory of empty txt files": (_bad_source("empty"), ["empty", "no train documents"]),
    "parquet that is not parquet": (_bad_source("c.parquet", b"not parquet at all"), ["c.parquet", "parquet"]),
    "json field missing": (_bad_source("d.jsonl", b'{"body": "a"}\n', field="text"), ["d.jsonl", "no field 'text'"]),
    "tokenizer that is not a tokenizer": (_tokenizer_not_a_tokenizer, ["tok.json", "not a tokenizer"]),
    "summary of a non-run directory": (_summary_of_a_non_run_dir, ["summary.json", "not a run directory"]),
    "torn summary.json": (_summary_torn, ["summary.json", "not valid JSON"]),
    "plan --json to an unwritable path": (_plan_json_unwritable, ["plan.json", "cannot be written"]),
    "config not UTF-8": (_config_not_utf8, ["cfg.yaml", "not UTF-8", "offset"]),
    "mistyped local directory": (_mistyped_local_dir, ["mydata/train", "no such file or directory", "not as a hub"]),
    "run dir is a file": (_run_dir_is_a_file, ["run", "is a file"]),
    "torn slurm_jobs.json": (_status_torn_jobs, ["slurm_jobs.json", "not valid JSON"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_message_without_traceback(work, capsys, case):
    setup, fragments = BAD_INPUTS[case]
    argv = setup(work)
    rc, _, err = llmagogy(argv, capsys)
    assert_one_message(rc, err, *fragments)


@pytest.mark.parametrize("which", ["path", "heldout"])
def test_a_local_path_gone_after_validation_is_no_hub_lookup(work, monkeypatch, which):
    import datasets

    from llmagogy_ds.config import DataSource
    from llmagogy_ds.data import corpus as D

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("looked up on the hub"))
    src = DataSource(path=str(work / "gone.txt")) if which == "path" else \
        DataSource(path=str(work / "train.txt"), heldout=str(work / "gone.txt"))
    with pytest.raises(D.DataError, match="gone.txt: no such file or directory"):
        D.read_source(src, "heldout", seed=0)


def test_debug_shows_the_traceback(work, capsys):
    for argv in (["--debug", "summary", work], ["summary", work, "--debug"]):
        rc, _, err = llmagogy(argv, capsys)
        assert rc == 2 and "Traceback" in err and "not a run directory" in err


def test_write_atomic_names_the_target_not_its_temporary_file(work, capsys, monkeypatch):
    """A read-only run dir (simulated: the tests may run as root, for whom nothing is read-only)."""
    real = Path.write_text

    def read_only(self, *a, **k):
        if self.name.endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", read_only)
    rc, _, err = llmagogy(["prepare", write(work / "cfg.yaml", raw_cfg()), "--run-dir", "run"], capsys)
    assert_one_message(rc, err, "PermissionError", f"run/{RD.UNPREPARED}: Permission denied")
    assert ".tmp" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only directory")
def test_read_only_run_dir(work, capsys):
    (work / "run").mkdir()
    (work / "run").chmod(0o555)
    try:
        rc, _, err = llmagogy(["prepare", write(work / "cfg.yaml", raw_cfg()), "--run-dir", "run"], capsys)
    finally:
        (work / "run").chmod(0o755)
    assert_one_message(rc, err, "run", "Permission denied")


# --------------------------------------------------------------------------- eval: models and results
@pytest.fixture
def finished_run(work):
    """A run dir with a tokenizer and a stage `model.pt` (fresh weights of the config's model)."""
    import torch

    from llmagogy_ds.model.stages import Plan

    cfg = config_from_dict(raw_cfg(), work)
    run = RD.open_run_dir(cfg, work / "run")
    tok, _ = DP.ensure_tokenizer(cfg, run)
    sdir = RD.stage_dir(run, cfg, 0)
    sdir.mkdir(parents=True)
    torch.save(Plan(cfg, tok.get_vocab_size()).model(0).state_dict(), sdir / RD.MODEL)
    return run, cfg, tok, sdir


def test_model_from_another_config_is_one_line(finished_run, capsys):
    import torch

    from llmagogy_ds.model.stages import Plan

    run, _, tok, sdir = finished_run
    wider = raw_cfg()
    wider["stages"][0]["model"].update(hidden=64, heads=4, ffn=128)
    torch.save(Plan(config_from_dict(wider, run.parent), tok.get_vocab_size()).model(0).state_dict(), sdir / RD.MODEL)
    rc, _, err = llmagogy(["eval", run], capsys)
    assert_one_message(rc, err, "model.pt", "trained with another config", "expected", "found")
    assert len(err.strip().splitlines()) == 1


def test_a_file_that_is_not_a_model(finished_run, capsys):
    run, _, _, sdir = finished_run
    (sdir / RD.MODEL).write_bytes(b"garbage")
    rc, _, err = llmagogy(["eval", run], capsys)
    assert_one_message(rc, err, "model.pt", "not a model weights file")


def test_eval_checks_its_output_before_computing(finished_run, capsys, monkeypatch):
    from llmagogy_ds.evaluation import results as R

    run, _, _, sdir = finished_run
    (sdir / RD.EVAL).mkdir()  # eval.json cannot be written (a read-only run, as root can test it)
    monkeypatch.setattr(R, "load_model", lambda *a, **k: pytest.fail("scores computed before the output was checked"))
    rc, _, err = llmagogy(["eval", run], capsys)
    assert_one_message(rc, err, "eval.json", "cannot be written")


# =========================================================================== 6. the dry-run script
FAKE_SBATCH = """#!/bin/bash
n=$(cat "$SBATCH_LOG.count" 2>/dev/null || echo 0)
echo $((n + 1)) > "$SBATCH_LOG.count"
printf '%s\\0' "$@" > "$SBATCH_LOG.$n"
echo "700$n"
"""


def _fake_sbatch(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "sbatch")}


def _sbatch_calls(tmp_path: Path, n: int) -> list[list[str]]:
    return [(tmp_path / f"sbatch.{i}").read_bytes().decode().split("\0")[:-1] for i in range(n)]


HOSTILE = "--comment={prev}$(touch PWNED)`touch PWNED2`;touch PWNED3"


def test_dry_run_script_quotes_every_argument(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run dir"  # a space, too
    rc, out, err = llmagogy(["submit", TINY, "--run-dir", run, "--dry-run",
                             "--set", f"defaults.resources.sbatch_args=[{json.dumps(HOSTILE)}]"], capsys)
    assert rc == 0, err
    assert "JOB-1" not in out
    script = out.strip().splitlines()
    for line in script:  # every argument reads back as itself
        argv = shlex.split(line[len("JOB0=$("):-1])
        assert HOSTILE in argv and str(run / "config.yaml") in argv
    assert "--dependency" not in script[0]
    subprocess.run(["bash", "-euc", out], cwd=tmp_path, env=_fake_sbatch(tmp_path), check=True)
    assert not list(tmp_path.glob("PWNED*"))  # nothing in an argument ran
    calls = _sbatch_calls(tmp_path, 3)
    assert not any(a.startswith("--dependency") for a in calls[0])
    assert "--dependency=afterok:7000" in calls[1] and "--dependency=afterok:7001" in calls[2]
    assert all(HOSTILE in c for c in calls)  # {prev} in a user's argument is left as written


def test_submit_chains_with_the_previous_job_id_only(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(S, "squeue_states", lambda: None)
    env = _fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("SBATCH_LOG", env["SBATCH_LOG"])
    cfg = load_config(TINY, [f"defaults.resources.sbatch_args=[{json.dumps(HOSTILE)}]"])
    assert S.submit(cfg, tmp_path / "run") == ["7000", "7001", "7002"]
    calls = _sbatch_calls(tmp_path, 3)
    assert not any(a.startswith("--dependency") for a in calls[0])
    assert "--dependency=afterok:7000" in calls[1] and "--dependency=afterok:7001" in calls[2]
    assert all(HOSTILE in c for c in calls)
