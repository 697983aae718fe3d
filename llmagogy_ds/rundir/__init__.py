"""The run directory: every path and file name, the frozen config, stage results, the summary;
its atomic writes (``files.py``) and weights (``weights.py``) are re-exported here.

::

    RUN/config.yaml                 frozen copy of the (merged, overridden) config
    RUN/config.unprepared           present until the first preparation succeeded: till then another
                                    config may replace config.yaml without --restart
    RUN/tokenizer.json
    RUN/data/<stage>-<fingerprint>/ packed token memmaps, exams
    RUN/stages/NN_<stage>/init/     weights the stage starts from (θ_start: fresh or grown), as
                                    safetensors shards + model.safetensors.index.json (``Weights``);
                                    runs written before: init.pt (and init_moments.pt)
                         growth.json loss_prev_model, loss_after_growth, exam after growth
                         checkpoints/ DeepSpeed checkpoints (complete ones carry complete.json)
                         metrics.jsonl, model/ and moments/ (final fp32 weights, Adam moments;
                         safetensors shards; runs written before: model.pt, moments.pt),
                         eval.json (the eval section's scores), result.json (stage done)
    RUN/summary.json
    RUN/curriculum.yaml, RUN/baseline.json   a baseline run: the curriculum it is compared with
    RUN/slurm_jobs.json             jobs `llmagogy submit` queued
    RUN/lineage.json, experts.json  an expert branch: the trunk stage it grew from; a trunk: its experts

Every write goes through a temporary file and ``os.replace``, so an interruption leaves the old
file or the new one, and every step can be re-run.
"""
from __future__ import annotations

import difflib
import os
import shlex
import time
from pathlib import Path

from llmagogy_ds.config import CurriculumConfig, load_config
from llmagogy_ds.rundir.files import RunDirError, check_writable, jsonable, read_json, write_atomic
from llmagogy_ds.rundir.weights import (HF_WEIGHTS, INIT, INIT_DIR, INIT_MOMENTS, MODEL, MODEL_DIR, MOMENTS,
                                        MOMENTS_DIR, SHARD_BYTES, WEIGHTS_INDEX, ShardWriter, Weights, begin_store,
                                        finish_store, weights_at, write_hf_weights, write_store)

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
DATA = "data"
STAGES = "stages"
SUMMARY = "summary.json"
CURRICULUM = "curriculum.yaml"  # a baseline run: the curriculum's config
BASELINE_INFO = "baseline.json"
JOBS = "slurm_jobs.json"
UNPREPARED = "config.unprepared"
# in a stage directory (its weights' names: weights.py)
GROWTH = "growth.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
CONTRAST = "contrast"  # `llmagogy contrast`'s default output folder, in FULL's run dir
ROUTE = "route"  # `llmagogy route`'s default output folder, in the gatekeeper's run dir
RESULT = "result.json"
LINEAGE, EXPERTS, EXPERTS_DIR = "lineage.json", "experts.json", "experts"  # expert branches (train/branch.py)


# --------------------------------------------------------------------------- paths
def stage_dir(run_dir: Path, cfg: CurriculumConfig, s: int) -> Path:
    return Path(run_dir) / STAGES / f"{s:02d}_{cfg.stages[s].name}"


def frozen_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG


def tokenizer_path(run_dir: Path) -> Path:
    return Path(run_dir) / TOKENIZER


def data_root(run_dir: Path) -> Path:
    return Path(run_dir) / DATA


def lineage_path(run_dir: Path) -> Path:
    return Path(run_dir) / LINEAGE


# --------------------------------------------------------------------------- the frozen config
# What a run dir may hold before its config.yaml (a baseline writes curriculum.yaml first, a size
# search may come before the run); anything else means the directory is not a run dir (`--run-dir .`,
# `runs/`), and is refused.
_RUN_ENTRIES = {CONFIG, TOKENIZER, DATA, STAGES, SUMMARY, CURRICULUM, BASELINE_INFO, JOBS, UNPREPARED, "slurm",
                "size_search", "report", LINEAGE}


def check_run_dir_path(run_dir: Path) -> None:
    """A new, empty or run directory: never a file, nor a folder of other things (`.`, `runs/`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: is a file, not a run directory")
    if run_dir.is_dir() and not frozen_config_path(run_dir).exists():
        foreign = sorted(p.name for p in run_dir.iterdir()
                         if p.name not in _RUN_ENTRIES and not p.name.startswith(".") and not p.name.endswith(".tmp"))
        if foreign:
            raise RunDirError(f"{run_dir}: not empty and holds no run (no {CONFIG}; it has {', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}): use a new or empty --run-dir")


def replaceable(run_dir: Path) -> bool:
    """True when the run dir's config was never prepared successfully and no stage has started:
    a fixed config may then replace it without --restart."""
    run_dir = Path(run_dir)
    stages = run_dir / STAGES
    started = stages.is_dir() and any(f.is_file() for f in stages.rglob("*"))
    return (run_dir / UNPREPARED).exists() and not started


def mark_unprepared(run_dir: Path) -> None:
    write_atomic(Path(run_dir) / UNPREPARED, "the frozen config may be replaced by another one until the data "
                                             "are prepared (`llmagogy prepare` or `run` removes this file)\n")


def replace_unprepared(run_dir: Path, frozen: Path, new: str, tokenizer_from_it: bool = True) -> None:
    """Replace the frozen config ``frozen`` of a ``replaceable`` run dir by ``new``. A tokenizer
    the failed preparation trained on another corpus goes with it (it is trained again)."""
    print(f"[llmagogy] {run_dir}: {frozen.name} was never prepared successfully; replacing it with this config")
    if tokenizer_from_it and _tokenizer_inputs(frozen.read_text()) != _tokenizer_inputs(new):
        tokenizer_path(run_dir).unlink(missing_ok=True)
    write_atomic(frozen, new)


def mark_prepared(run_dir: Path) -> None:
    """Preparation succeeded: from now on the frozen config is the run's for good."""
    (Path(run_dir) / UNPREPARED).unlink(missing_ok=True)


def _tokenizer_inputs(text: str) -> object:
    import yaml

    raw = yaml.safe_load(text) or {}
    stages = raw.get("stages") or []
    return raw.get("tokenizer"), (raw.get("run") or {}).get("seed"), [st.get("data") for st in stages]


def open_run_dir(cfg: CurriculumConfig, run_dir: Path, restart: bool = False, until_prepared: bool = False) -> Path:
    """Create the run dir with a frozen config, or check that the existing one matches.

    A different frozen config is refused (``--restart`` moves the old run aside; nothing is
    deleted). ``until_prepared``: the caller prepares the data next and calls ``mark_prepared``
    when that succeeds; until then (a data error), a fixed config may replace this one.
    """
    run_dir = Path(run_dir)
    check_run_dir_path(run_dir)
    frozen = frozen_config_path(run_dir)
    new = cfg.to_yaml()
    if frozen.exists() and frozen.read_text() != new:
        old = frozen.read_text()
        if restart:
            move_aside(run_dir)
        elif until_prepared and replaceable(run_dir):
            # a baseline's tokenizer comes from its curriculum.yaml, not from this derived config
            replace_unprepared(run_dir, frozen, new, tokenizer_from_it=not (run_dir / CURRICULUM).exists())
        else:
            diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                "run config", "this config", n=0))
            raise RunDirError(
                f"{run_dir} holds a run with a different config; refusing to mix them.\n{diff}\n"
                "Use another --run-dir, or --restart to move the existing run aside and start over.")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not frozen.exists():
        if until_prepared:  # first: a kill between the two writes leaves a replaceable config
            mark_unprepared(run_dir)
        write_atomic(frozen, new)
    return run_dir


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``RUN.old-DATE`` (``--restart``: nothing is deleted)."""
    run_dir = Path(os.path.abspath(run_dir))  # `.` and `..` have no name to extend
    cwd = Path.cwd().resolve()
    if run_dir.resolve() == cwd or run_dir.resolve() in cwd.parents:
        raise RunDirError(f"{run_dir}: refusing to move aside a directory that holds the current directory")
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two restarts within a second must not collide
        aside, n = aside.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    os.replace(run_dir, aside)
    print(f"moved the previous run to {aside}")
    return aside


def load_run_config(run_dir: Path) -> CurriculumConfig:
    frozen = frozen_config_path(run_dir)
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not frozen.exists():
        raise RunDirError(f"{run_dir}: no config.yaml; start the run with "
                          f"`llmagogy run CONFIG --run-dir {shlex.quote(str(run_dir))}`")
    return load_config(frozen)


def curriculum_config(run_dir: Path) -> CurriculumConfig | None:
    """The curriculum a baseline run is compared with (None: ``run_dir`` is not a baseline run)."""
    f = Path(run_dir) / CURRICULUM
    return load_config(f) if f.exists() else None


# --------------------------------------------------------------------------- results
def stage_result(run_dir: Path, cfg: CurriculumConfig, s: int) -> dict | None:
    return read_json(stage_dir(run_dir, cfg, s) / RESULT)


def write_summary(cfg: CurriculumConfig, run_dir: Path) -> dict:
    stages = []
    cum = 0.0
    for s, st in enumerate(cfg.stages):
        r = stage_result(run_dir, cfg, s)
        if r is None:
            stages.append({"name": st.name, "status": "pending"})
            continue
        cum += r["flops"]
        stages.append({**r, "cumulative_flops": cum, "status": "done"})
    summary = {"run": cfg.run.name, "stages": stages, "total_flops": cum}
    write_atomic(Path(run_dir) / SUMMARY, summary)
    return summary


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / SUMMARY
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    summary = read_json(path)
    if summary is None:
        what = "no stage has finished yet" if frozen_config_path(run_dir).exists() else "not a run directory"
        raise RunDirError(f"{run_dir}: no {SUMMARY} ({what})")
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list):
        raise RunDirError(f"{path}: not a run summary (no 'stages' list)")
    return summary


def run_plan(run_dir: Path, cfg: CurriculumConfig, vocab: int):
    """The run's ``model.stages.Plan`` (every stage's layout and F), with the RMSNorm epsilon rule
    its first growth was made under: runs grown before one-epsilon norms keep per-norm epsilons."""
    from llmagogy_ds.model.stages import Plan, keeps_per_norm_eps  # torch: not for the quick commands

    first = read_json(stage_dir(run_dir, cfg, 1) / GROWTH) if len(cfg.stages) > 1 else None
    return Plan(cfg, vocab, per_norm_eps=keeps_per_norm_eps(first))


__all__ = ["weights_at", "Weights", "ShardWriter", "begin_store", "finish_store", "write_store", "write_hf_weights",
           "INIT", "INIT_MOMENTS", "MODEL", "MOMENTS", "INIT_DIR", "MODEL_DIR", "MOMENTS_DIR", "WEIGHTS_INDEX",
           "SHARD_BYTES", "HF_WEIGHTS"]
__all__ += ["run_plan", "RunDirError", "jsonable", "write_atomic", "read_json", "stage_dir", "frozen_config_path",
           "tokenizer_path", "data_root", "lineage_path", "open_run_dir", "move_aside", "load_run_config",
           "curriculum_config", "stage_result", "write_summary", "read_summary", "check_run_dir_path", "check_writable",
           "replaceable", "mark_unprepared", "replace_unprepared", "mark_prepared"]
