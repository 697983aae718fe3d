"""Start a stage's ranks: torchrun on this machine (``llmagogy run``), or the command that
srun / the deepspeed launcher runs on each node."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def stage_command(run_dir: Path, stage: str, nproc: int, extra: list[str] = ()) -> list[str]:
    """torchrun on one node with ``nproc`` ranks (a free port each time: --standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llmagogy_ds.train", "--run-dir", str(run_dir), "--stage", stage, *extra]


def stage_env(nproc: int) -> dict:
    env = dict(os.environ)
    # split the cores between the ranks instead of oversubscribing them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # torch deprecations inside DeepSpeed
    return env


def run_stage(run_dir: Path, stage: str, nproc: int, extra: list[str] = ()) -> int:
    return subprocess.call(stage_command(run_dir, stage, nproc, extra), env=stage_env(nproc))
