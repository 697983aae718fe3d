"""The run directory: every path and file name, the frozen config, stage results, the summary,
and the one atomic-write helper (strict JSON: NaN/inf are written as null, never as invalid JSON).

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
import json
import math
import os
import shlex
import time
from collections.abc import Mapping
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
UNPREPARED = "config.unprepared"
# in a stage directory
INIT = "init.pt"
INIT_MOMENTS = "init_moments.pt"
GROWTH = "growth.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
MOMENTS = "moments.pt"
# the same as safetensors shards (a folder each; a run written before has the .pt files above)
INIT_DIR, MODEL_DIR, MOMENTS_DIR = "init", "model", "moments"
WEIGHTS_INDEX = "model.safetensors.index.json"  # Hugging Face's name; written last: the folder is complete
SHARD_BYTES = 1 << 25  # a writer holds one shard file's tensors (32 MiB; twice that while it writes them)
EVAL = "eval.json"
CONTRAST = "contrast"  # `llmagogy contrast`'s default output folder, in FULL's run dir
ROUTE = "route"  # `llmagogy route`'s default output folder, in the gatekeeper's run dir
RESULT = "result.json"
LINEAGE, EXPERTS, EXPERTS_DIR = "lineage.json", "experts.json", "experts"  # expert branches (train/branch.py)


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


# --------------------------------------------------------------------------- weights
def weights_at(sdir: Path, kind: str = MODEL_DIR) -> Path | None:
    """A stage's weights of ``kind`` (``init``, ``model`` or ``moments``): the complete folder of
    safetensors shards, else the single ``.pt`` file of a run written before them, else None."""
    store = Path(sdir) / kind
    if (store / WEIGHTS_INDEX).exists():
        return store
    old = Path(sdir) / f"{kind}.pt"
    return old if old.exists() else None


class Weights(Mapping):
    """Tensors by name, read one at a time by memory map, from a folder of safetensors shards or
    an old ``.pt`` (``torch.load(mmap=True)``): nobody holds a whole model to read a part of it.
    ``slice(name, dim, n, i)`` reads only part ``i`` of ``n`` along ``dim`` (a TP slice)."""

    def __init__(self, path: Path):
        import torch

        self.path = Path(path)
        self._shapes: dict | None = None
        if self.path.is_dir():
            index = read_json(self.path / WEIGHTS_INDEX)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise RunDirError(f"{self.path / WEIGHTS_INDEX}: not a weights index (no weight_map)")
            self.files, self.metadata, self._sd = index["weight_map"], index.get("metadata") or {}, None
        else:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # not a torch file, truncated, pickled objects that are not tensors
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise RunDirError(f"{self.path}: not a model weights file ({reason})") from None
            if not isinstance(sd, dict):
                raise RunDirError(f"{self.path}: not a model weights file (a {type(sd).__name__}, not a state dict)")
            self.metadata = {k: v for k, v in sd.items() if not torch.is_tensor(v)}  # moments.pt: steps
            self._sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
            self.files = dict.fromkeys(self._sd)

    def _read(self, name: str, part=None):
        """One tensor (or ``part`` of it, a tuple of slices) through a map of its file opened for
        this read only: a mapping kept open would keep every page read so far resident."""
        from safetensors import safe_open

        with safe_open(str(self.path / self.files[name]), framework="pt") as h:
            return h.get_tensor(name) if part is None else h.get_slice(name)[part]

    def __contains__(self, name) -> bool:  # by the index, not by reading the tensor (Mapping's way)
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, name: str):
        if name not in self.files:
            raise KeyError(name)
        return self._sd[name] if self._sd is not None else self._read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[name].shape)
        if self._shapes is None:  # from the shards' headers (nothing is read)
            from safetensors import safe_open

            self._shapes = {}
            for f in set(self.files.values()):
                with safe_open(str(self.path / f), framework="pt") as h:
                    self._shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        return self._shapes[name]

    def slice(self, name: str, dim: int | None, n: int, i: int):
        """Part ``i`` of ``n`` equal parts of ``name`` along ``dim`` (None or n = 1: whole)."""
        if dim is None or n == 1:
            return self[name]
        if self._sd is not None:
            return self._sd[name].chunk(n, dim=dim)[i].clone()
        shape = self.shape(name)
        index = [slice(None)] * len(shape)
        index[dim] = slice(i * shape[dim] // n, (i + 1) * shape[dim] // n)
        return self._read(name, tuple(index))

    def load(self) -> dict:
        """Every tensor, as a plain dict (a small model, or a consumer that needs it whole)."""
        return {k: self[k].clone() for k in self.files}


class ShardWriter:
    """One writer's tensors into the folder ``store`` as safetensors files ``part-<who>-NNNNN``
    of about ``max_bytes`` each; it holds one file's tensors at a time. Several writers (pipeline
    stages) fill one folder; ``finish_store`` then indexes it."""

    def __init__(self, store: Path, who: str, max_bytes: int = SHARD_BYTES):
        self.store, self.who, self.max_bytes = Path(store), who, max_bytes
        self.buf: dict = {}
        self.size, self.n = 0, 0

    def add(self, name: str, t) -> None:
        t = t.detach().to("cpu").clone().contiguous()  # a copy: params may be views of one flat buffer
        self.buf[name] = t
        self.size += t.numel() * t.element_size()
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        from safetensors.torch import save_file

        buf = self.buf
        write_atomic(self.store / f"part-{self.who}-{self.n:05d}.safetensors", lambda tmp: save_file(buf, str(tmp)))
        self.buf, self.size, self.n = {}, 0, self.n + 1

    close = flush


def begin_store(store: Path) -> Path:
    """An empty folder for a new set of shards (what a torn earlier attempt left is replaced)."""
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    Path(store).mkdir(parents=True)
    return Path(store)


def finish_store(store: Path, expected=None, metadata: dict | None = None) -> Path:
    """Index every shard of ``store`` (after all writers closed) into ``model.safetensors.index.json``,
    written last: a folder without it is incomplete and never read. ``expected``: the names it must hold."""
    from safetensors import safe_open

    weight_map, total = {}, 0
    for f in sorted(Path(store).glob("part-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                weight_map[k] = f.name
                total += int(np.prod(sl.get_shape())) * {"F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 8)
    if expected is not None and set(expected) != set(weight_map):
        missing, extra = sorted(set(expected) - set(weight_map)), sorted(set(weight_map) - set(expected))
        raise RunDirError(f"{store}: the shards do not hold the expected tensors (missing: {missing[:4]}, "
                          f"unexpected: {extra[:4]})")
    write_atomic(Path(store) / WEIGHTS_INDEX, {"metadata": {"total_size": total, **(metadata or {})},
                                               "weight_map": weight_map})
    return Path(store)


def write_store(store: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """A whole (small) state dict as a complete folder of shards, by one process."""
    begin_store(store)
    w = ShardWriter(store, "000")
    for k, v in tensors.items():
        w.add(k, v)
    w.close()
    return finish_store(store, tensors.keys(), metadata)


__all__ = ["weights_at", "Weights", "ShardWriter", "begin_store", "finish_store", "write_store", "INIT_DIR",
           "MODEL_DIR", "MOMENTS_DIR", "WEIGHTS_INDEX", "SHARD_BYTES"]
__all__ += ["run_plan", "RunDirError", "jsonable", "write_atomic", "read_json", "stage_dir", "frozen_config_path",
           "tokenizer_path", "data_root", "lineage_path", "open_run_dir", "move_aside", "load_run_config",
           "curriculum_config", "stage_result", "write_summary", "read_summary", "check_run_dir_path", "check_writable",
           "replaceable", "mark_unprepared", "replace_unprepared", "mark_prepared"]
