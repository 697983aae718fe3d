"""The files of a stage checkpoint, checked before anything trusts them.

* ``complete.json`` (the marker) is written by rank 0, atomically, once every file of the
  checkpoint exists; it records the size of each file it vouches for. A marker that is empty,
  not JSON, incomplete or about another step is no marker: the checkpoint is not complete.
* Before a checkpoint is resumed from (and before DeepSpeed, ``ds_to_universal`` or
  ``zero_to_fp32`` unpickle it with ``weights_only=False``), rank 0 checks it: the marker,
  every recorded file at its recorded size, and every ``.pt`` file unpickled with
  ``weights_only=True`` and only the few classes DeepSpeed's files hold (``SAFE_GLOBALS``), so
  a planted pickle is refused before any unrestricted loader sees it.
* A checkpoint that fails the check, or that a rank failed to load (``load-failed-rank*.txt``),
  is set aside: renamed ``<tag>.bad-<reason>``, never deleted, with a one-line message. The
  stage resumes from the previous complete checkpoint, or from its ``init/`` weights when none is left.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import torch

from llmagogy_ds import rundir as RD

TAG_RE = re.compile(r"^step(\d{8})$")
MARKER = "complete.json"
LOAD_FAILED = "load-failed-rank{}.txt"  # a rank's note that DeepSpeed could not load the checkpoint
REQUIRED = ("step", "world_size", "zero_stage")  # what a resume reads from the marker


class CheckpointError(RuntimeError):
    pass


class BadCheckpoint(CheckpointError):
    """A checkpoint that must not be used; ``reason`` is a short slug for its new name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# --------------------------------------------------------------------------- loading safely
def safe_globals() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3, pipeline, TP and
    universal checkpoints): numpy arrays (the RNG states), the loss scaler, the ZeRO stage enum
    and fragment addresses. Nothing that can run code."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32)), LossScaler,
            DynamicLossScaler, ZeroStageEnum, fragment_address, *_extra_globals()]


def _extra_globals() -> list:
    """``LLMAGOGY_SAFE_GLOBALS=pkg.module.Class,…``: classes another DeepSpeed version stores in
    its checkpoints (the save-time check names them), allowed without a code change."""
    import importlib

    out = []
    for name in filter(None, (x.strip() for x in os.environ.get("LLMAGOGY_SAFE_GLOBALS", "").split(","))):
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError, ValueError) as e:
            raise CheckpointError(f"LLMAGOGY_SAFE_GLOBALS: cannot import {name!r} ({e})") from None
    return out


def safe_load(path: Path, mmap: bool = False, allowed: list | None = None):
    """``torch.load`` with ``weights_only=True`` and the allow-listed classes only."""
    with torch.serialization.safe_globals(safe_globals() if allowed is None else allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def screen(path: Path) -> None:
    """Raise ``BadCheckpoint`` unless ``path`` unpickles with ``weights_only=True``. Memory-mapped
    (zip files, DeepSpeed's default): the pickle is read, the tensor data is not."""
    path = Path(path)
    allowed = safe_globals()  # outside the try: a bad LLMAGOGY_SAFE_GLOBALS is not a bad checkpoint
    try:
        safe_load(path, mmap=zipfile.is_zipfile(path), allowed=allowed)
    except Exception as e:
        msg = str(e)
        g = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if g:  # a class or function outside the allow-list: not a checkpoint this trainer wrote
            raise BadCheckpoint("untrusted", f"{path.name} holds a pickle that calls {g.group(1)}, which "
                                             "weights-only loading refuses (planted or foreign file)")
        w = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", msg, re.S)
        why = (w.group(1) if w else msg.splitlines()[0] if msg else "").strip().split(". ")[0]
        raise BadCheckpoint("unreadable", f"{path.name} cannot be read ({type(e).__name__}: {why[:200]})")


# --------------------------------------------------------------------------- the marker
def file_sizes(tag_dir: Path) -> dict[str, int]:
    """Every file of a checkpoint (but the marker and load notes) and its size in bytes."""
    tag_dir = Path(tag_dir)
    return {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.startswith("load-failed-rank")}


def write_marker(tag_dir: Path, info: dict) -> None:
    """Rank 0, once every file of the checkpoint is written: the marker with their sizes."""
    RD.write_atomic(Path(tag_dir) / MARKER, {**info, "files": file_sizes(tag_dir)})


def read_marker(tag_dir: Path) -> dict:
    """The marker's content; ``BadCheckpoint("marker", …)`` when it is missing, empty, partial,
    incomplete or about another step."""
    path = Path(tag_dir) / MARKER
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise BadCheckpoint("marker", f"{MARKER} cannot be read ({e.strerror or e})")
    if not text.strip():
        raise BadCheckpoint("marker", f"{MARKER} is empty (written partly when the job was killed?)")
    try:
        info = json.loads(text)
    except ValueError as e:
        raise BadCheckpoint("marker", f"{MARKER} is not complete JSON ({e})")
    if not isinstance(info, dict):
        raise BadCheckpoint("marker", f"{MARKER} is not a JSON object")
    if not isinstance(info.get("step"), int):
        raise BadCheckpoint("marker", f"{MARKER} has no step")
    m = TAG_RE.match(Path(tag_dir).name)
    if m and info["step"] != int(m.group(1)):
        raise BadCheckpoint("marker", f"{MARKER} is about step {info['step']}, not {int(m.group(1))}")
    return info


def check(tag_dir: Path) -> dict:
    """Everything that can be checked without trusting a pickle: the marker, a rank's note that
    loading failed, every recorded file at its size, every ``.pt`` unpickled with
    ``weights_only=True``. Returns the marker; raises ``BadCheckpoint``."""
    tag_dir = Path(tag_dir)
    info = read_marker(tag_dir)
    if any(k not in info for k in REQUIRED):
        raise BadCheckpoint("marker", f"{MARKER} lacks {', '.join(k for k in REQUIRED if k not in info)}")
    notes = sorted(tag_dir.glob(LOAD_FAILED.format("*")))
    if notes:
        first = notes[0].read_text(errors="replace").strip().splitlines() or ["?"]
        raise BadCheckpoint("load", f"a rank could not load it: {first[0][:300]}")
    for name, size in (info.get("files") or {}).items():  # markers written before sizes: none
        f = tag_dir / name
        if not f.is_file():
            raise BadCheckpoint("files", f"{name} is missing")
        if f.stat().st_size != size:
            raise BadCheckpoint("files", f"{name} is {f.stat().st_size} bytes, the marker says {size}")
    pts = sorted(tag_dir.rglob("*.pt"))
    if not pts:
        raise BadCheckpoint("files", "it holds no .pt file")
    for f in pts:
        screen(f)
    return info


# --------------------------------------------------------------------------- which checkpoints
def marked_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a marker file, whatever it holds, oldest first."""
    if not Path(ckpt_dir).exists():
        return []
    return sorted(p.name for p in Path(ckpt_dir).iterdir()
                  if p.is_dir() and TAG_RE.match(p.name) and (p / MARKER).exists())


def marker_ok(tag_dir: Path) -> bool:
    try:
        read_marker(tag_dir)
        return True
    except BadCheckpoint:
        return False


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first: those with a valid marker (a torn one, without a
    marker or with an empty or partial one, is never chosen)."""
    return [t for t in marked_tags(ckpt_dir) if marker_ok(Path(ckpt_dir) / t)]


def problems(ckpt_dir: Path) -> dict[str, str]:
    """For ``llmagogy status``: torn markers (tag → reason) and checkpoints set aside (name → "set aside")."""
    ckpt_dir = Path(ckpt_dir)
    out = {}
    for t in marked_tags(ckpt_dir):
        try:
            read_marker(ckpt_dir / t)
        except BadCheckpoint as e:
            out[t] = f"torn: {e}"
    if ckpt_dir.exists():
        out.update({p.name: "set aside" for p in sorted(ckpt_dir.glob("step*.bad-*"))})
    return out


def set_aside(ckpt_dir: Path, tag: str, err: BadCheckpoint) -> Path:
    """Rename ``tag`` (and its universal conversion) to ``<name>.bad-<reason>``; never delete."""
    ckpt_dir = Path(ckpt_dir)
    moved = None
    for name in (tag, f"{tag}_universal"):
        src = ckpt_dir / name
        if not src.exists():
            continue
        dst, n = ckpt_dir / f"{name}.bad-{err.reason}", 1
        while dst.exists():
            dst, n = ckpt_dir / f"{name}.bad-{err.reason}-{n}", n + 1
        os.replace(src, dst)
        moved = moved or dst
    print(f"[llmagogy] checkpoint {ckpt_dir / tag} is not usable ({err}); set aside as {moved.name}, nothing deleted",
          flush=True)
    return moved


def choose(ckpt_dir: Path, accept=None) -> str | None:
    """Rank 0: the newest complete checkpoint that passes ``check`` (and ``accept(tag)``, which
    may raise ``BadCheckpoint``: a conversion that fails); each one that does not is set aside.
    None: start from init."""
    ckpt_dir = Path(ckpt_dir)
    set_aside_any = False
    for tag in reversed(marked_tags(ckpt_dir)):
        try:
            check(ckpt_dir / tag)
            if accept is not None:
                accept(tag)
            if set_aside_any:
                print(f"[llmagogy] resuming from the previous complete checkpoint, {tag}", flush=True)
            return tag
        except BadCheckpoint as e:
            set_aside(ckpt_dir, tag, e)
            set_aside_any = True
    if set_aside_any:
        print(f"[llmagogy] {ckpt_dir}: no usable checkpoint left; the stage starts again from its init weights",
              flush=True)
    return None


def note_load_failure(tag_dir: Path, rank: int, err: BaseException) -> None:
    """A rank that failed to load ``tag_dir`` leaves a note; the next run sets the checkpoint aside."""
    RD.write_atomic(Path(tag_dir) / LOAD_FAILED.format(rank), f"rank {rank}: {type(err).__name__}: {err}\n")


__all__ = ["TAG_RE", "MARKER", "CheckpointError", "BadCheckpoint", "tag_for", "safe_globals", "safe_load", "screen",
           "file_sizes", "write_marker", "read_marker", "check", "marked_tags", "complete_tags", "problems",
           "set_aside", "choose", "note_load_failure"]
