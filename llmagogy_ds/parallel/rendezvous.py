"""How the ranks of a stage find each other: from torchrun / the deepspeed launcher, or from
SLURM's variables when ``srun`` starts one task per rank; the collective timeout."""
from __future__ import annotations

import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (``node[003-005,9],gpu1`` -> ``node003``), what
    ``scontrol show hostnames LIST | head -1`` prints, without needing scontrol on the node."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    # every bracket group contributes the start of its first range (zero padding kept)
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", nodelist[:end])


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed form, e.g. ``2(x3),1``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot read SLURM tasks per node {tasks_per_node!r}")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts[node_id]


def master_port(job_id: str | int) -> int:
    """Rendezvous port of a job: fixed per job (all its steps and requeues agree on it), different
    for concurrent jobs sharing a node."""
    return 20000 + int(job_id) % 20000


def rank_env_from_slurm(env: dict | os._Environ) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for a process that
    ``srun`` started as one task per rank; ``{}`` when a launcher already set RANK or this is not
    an srun task.

    SLURM_STEP_NUM_TASKS is what marks an srun task: the batch shell also has SLURM_PROCID=0 and
    SLURM_NTASKS, and a process started there directly must not wait for ranks that never come.
    """
    if "RANK" in env or "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "SLURM_STEP_TASKS_PER_NODE" in env:
        out["LOCAL_WORLD_SIZE"] = str(tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], int(env.get("SLURM_NODEID", 0))))
    if "MASTER_ADDR" not in env:  # stage.sh exports it; a bare srun gets the step's first node
        out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(master_port(env.get("SLURM_JOB_ID", "0")))
    return out


def positive_seconds(env: dict | os._Environ, name: str, default: float) -> float:
    """The environment variable ``name`` as a positive number of seconds (``default`` if unset)."""
    raw = env.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def collective_timeout(env: dict | os._Environ) -> float:
    """Seconds before a collective gives up (LLMAGOGY_COLLECTIVE_TIMEOUT, default 600)."""
    return positive_seconds(env, "LLMAGOGY_COLLECTIVE_TIMEOUT", 600)


def build_lock_timeout(env: dict | os._Environ) -> float:
    """Seconds after which a JIT-build lock counts as stale (LLMAGOGY_BUILD_LOCK_TIMEOUT, default 300)."""
    return positive_seconds(env, "LLMAGOGY_BUILD_LOCK_TIMEOUT", 300)


def extensions_root() -> Path:
    """Where torch JIT-builds extensions (DeepSpeed's ops): TORCH_EXTENSIONS_DIR or torch's default."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(root: Path, stale_after: float, poll: float = 1.0) -> list[Path]:
    """Remove the build locks under ``root`` (``<root>/<python-device>/<op>/lock``) that are older
    than ``stale_after`` seconds, after waiting for younger ones to go or age; returns the removed.

    torch's lock is a bare file that every load of a JIT op (DeepSpeed builds its CPU shm op at
    ``init_distributed``, FusedAdam on GPU) holds for a moment: a rank killed then (scancel,
    preemption, a time limit) leaves it, and every later start on that home directory waits for
    it forever. A live build is done well within the timeout, so an older lock is stale.
    """
    removed = []
    for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:  # its build ended (or another rank removed it)
                break
            if age >= stale_after:
                lock.unlink(missing_ok=True)
                removed.append(lock)
                print(f"llmagogy: removed the stale build lock {lock} ({age:.0f} s old, left by a process that "
                      f"was killed while loading a JIT op; LLMAGOGY_BUILD_LOCK_TIMEOUT={stale_after:g} s)",
                      file=sys.stderr, flush=True)
                break
            time.sleep(min(poll, stale_after - age))
    return removed


def init_distributed() -> None:
    """Join the process group: under torchrun / the deepspeed launcher (RANK etc. set), or as one
    task of ``srun`` (one task per rank: the rank comes from SLURM's variables).

    Collectives time out after ``LLMAGOGY_COLLECTIVE_TIMEOUT`` seconds (default 600), so a rank
    that hangs or died makes the others fail and the job end, instead of waiting forever. A JIT
    build lock that a killed process left is removed first (``clear_stale_build_locks``).
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(rank_env_from_slurm(os.environ))
        clear_stale_build_locks(extensions_root(), build_lock_timeout(os.environ))
        deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=collective_timeout(os.environ)))


__all__ = ["first_host", "tasks_on_node", "master_port", "rank_env_from_slurm", "positive_seconds", "collective_timeout",
           "build_lock_timeout", "extensions_root", "clear_stale_build_locks", "init_distributed"]
