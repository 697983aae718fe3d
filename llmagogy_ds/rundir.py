"""The run directory: every path and file name, the frozen config, stage results, the summary,
and the one atomic-write helper (strict JSON: NaN/inf are written as null, never as invalid JSON).

::

    RUN/config.yaml                 frozen copy of the (merged, overridden) config
    RUN/tokenizer.json
    RUN/data/<stage>-<fingerprint>/ packed token memmaps, exams
    RUN/stages/NN_<stage>/init.pt   weights the stage starts from (θ_start: fresh or grown)
                         init_moments.pt  Adam moments carried across growth (growth.optimizer: carry)
                         growth.json loss_prev_model, loss_after_growth, exam after growth
                         checkpoints/ DeepSpeed checkpoints (complete ones carry complete.json)
                         metrics.jsonl, model.pt and moments.pt (final fp32 weights, Adam moments),
                         eval.json (the eval section's scores), result.json (stage done)
    RUN/summary.json
    RUN/curriculum.yaml, RUN/baseline.json   a baseline run: the curriculum it is compared with
    RUN/slurm_jobs.json             jobs `llmagogy submit` queued

Every write goes through a temporary file and ``os.replace``, so an interruption leaves the old
file or the new one, and every step can be re-run.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from llmagogy_ds.config import CurriculumConfig, load_config

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
DATA = "data"
STAGES = "stages"
SUMMARY = "summary.json"
CURRICULUM = "curriculum.yaml"  # a baseline run: the curriculum's config
BASELINE_INFO = "baseline.json"
JOBS = "slurm_jobs.json"
# in a stage directory
INIT = "init.pt"
INIT_MOMENTS = "init_moments.pt"
GROWTH = "growth.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
MOMENTS = "moments.pt"
EVAL = "eval.json"
RESULT = "result.json"


class RunDirError(RuntimeError):
    pass


# --------------------------------------------------------------------------- atomic writes
def jsonable(x):
    """Strict-JSON-ready copy: NaN/inf → None, numpy scalars and paths → Python."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None  # strict JSON has no NaN/inf
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_atomic(path: Path, content, check=None) -> Path:
    """Write ``content`` to ``path`` through a temporary file in the same directory, then rename:
    str as text, dict/list as strict JSON (NaN → null) for a ``.json`` path, a callable as
    ``content(tmp_path)`` (numpy ``tofile``, ``savefig``), anything else with ``torch.save``.
    ``check(tmp_path)``, if given, may raise to refuse the new file (nothing is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never mix
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, (dict, list)) and path.suffix == ".json":
            tmp.write_text(json.dumps(jsonable(content), indent=1, allow_nan=False) + "\n")
        elif callable(content):
            content(tmp)
        else:
            import torch  # lazily: the CLI's quick commands never write tensors

            torch.save(content, tmp)
        if check is not None:
            check(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- paths
def stage_dir(run_dir: Path, cfg: CurriculumConfig, s: int) -> Path:
    return Path(run_dir) / STAGES / f"{s:02d}_{cfg.stages[s].name}"


def frozen_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG


def tokenizer_path(run_dir: Path) -> Path:
    return Path(run_dir) / TOKENIZER


def data_root(run_dir: Path) -> Path:
    return Path(run_dir) / DATA


# --------------------------------------------------------------------------- the frozen config
def open_run_dir(cfg: CurriculumConfig, run_dir: Path, restart: bool = False) -> Path:
    """Create the run dir with a frozen config, or check that the existing one matches.

    A different frozen config is refused (``--restart`` moves the old run aside; nothing is
    deleted).
    """
    run_dir = Path(run_dir)
    frozen = frozen_config_path(run_dir)
    new = cfg.to_yaml()
    if frozen.exists() and frozen.read_text() != new:
        if not restart:
            diff = "".join(difflib.unified_diff(frozen.read_text().splitlines(True), new.splitlines(True),
                                                "run config", "this config", n=0))
            raise RunDirError(
                f"{run_dir} holds a run with a different config; refusing to mix them.\n{diff}\n"
                "Use another --run-dir, or --restart to move the existing run aside and start over.")
        move_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not frozen.exists():
        write_atomic(frozen, new)
    return run_dir


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``RUN.old-DATE`` (``--restart``: nothing is deleted)."""
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two restarts within a second must not collide
        aside, n = aside.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    os.replace(run_dir, aside)
    print(f"moved the previous run to {aside}")
    return aside


def load_run_config(run_dir: Path) -> CurriculumConfig:
    frozen = frozen_config_path(run_dir)
    if not frozen.exists():
        raise RunDirError(f"{run_dir}: no config.yaml; start the run with `llmagogy run CONFIG --run-dir {run_dir}`")
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


__all__ = ["RunDirError", "jsonable", "write_atomic", "read_json", "stage_dir", "frozen_config_path",
           "tokenizer_path", "data_root", "open_run_dir", "move_aside", "load_run_config", "curriculum_config",
           "stage_result", "write_summary"]
