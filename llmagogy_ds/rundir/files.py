"""The run directory's one atomic writer (strict JSON: NaN/inf are written as null, never as
invalid JSON), its JSON reader, and the error every bad run-directory file raises."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


class RunDirError(RuntimeError):
    pass


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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == str(tmp):
            e.filename = str(path)  # name the file the user knows, not our temporary one
        raise
    os.replace(tmp, path)
    return path


def check_writable(path: Path) -> Path:
    """Fail now, naming ``path``, if it cannot be written (before computing what goes into it).
    Creates nothing: the folders ``write_atomic`` would make are checked at their first existing one."""
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"{path}: cannot be written (a directory is there)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"{path}: cannot be written ({parent} is not a directory)")
    probe = parent / f".{path.name}.{os.getpid()}.probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{path}: cannot be written ({e.strerror or e})") from None
    return path


def read_json(path: Path) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e}); it was written or changed by something else") from None


__all__ = ["RunDirError", "jsonable", "write_atomic", "check_writable", "read_json"]
