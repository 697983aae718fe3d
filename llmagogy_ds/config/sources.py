"""What a stage's data may name (synthetic levels, local files or directories, hub datasets),
and the SLURM resources block: resolution and checks."""

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmagogy_ds.config.coerce import _Block, _check_keys, _Ctx, _Errors, _field_names, _is_number, _resolve, _section
from llmagogy_ds.config.schema import (_SYNTHETIC_RE, DATA_EXTENSIONS, DATA_FORMATS, TOKEN_DTYPES, DataSource,
                                       _looks_like_path)

# Synthetic corpus levels a config may name as `synthetic:levelN` (number -> what it teaches);
# llmagogy_ds.data.synthetic generates them.
SYNTHETIC_LEVELS: dict[int, str] = {
    0: "nursery",
    1: "facts",
    2: "column arithmetic",
    3: "word problems",
}


# `owner/name` or `name`, as on the Hugging Face hub.
_HUB_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _check_local(p: Path, where: str, errs: _Errors) -> None:
    if p.is_file():
        if p.suffix.lower() not in DATA_EXTENSIONS:
            errs.add(where, f"unsupported file type {p.suffix!r} for {p} (expected {', '.join(DATA_EXTENSIONS)})")
        elif p.stat().st_size == 0:
            errs.add(where, f"data file is empty: {p}")
    elif p.is_dir():
        if not any(c.is_file() and c.suffix.lower() in DATA_EXTENSIONS for c in p.rglob("*")):
            errs.add(where, f"directory has no {'/'.join(DATA_EXTENSIONS)} files: {p}")
    else:
        errs.add(where, f"not a regular file or directory: {p}")


def _check_synthetic(path: str, where: str, errs: _Errors) -> None:
    m = _SYNTHETIC_RE.fullmatch(path)
    if not m:
        errs.add(where, f"expected 'synthetic:levelN' with N a non-negative integer, got {path!r}")
        return
    level = int(m.group(1))
    errs.check(level in SYNTHETIC_LEVELS, where, f"unknown synthetic level {level} (see llmagogy_ds.synthetic.LEVELS)")


def _existing_first_part(path: str, base_dir: Path) -> Path | None:
    """The local directory a relative ``a/b`` path starts with (beside the config or in the
    current directory), or None."""
    parts = Path(path).parts
    if len(parts) < 2:
        return None
    for root in (base_dir, Path.cwd()):
        if (root / parts[0]).exists():
            return (root / parts[0]).resolve()
    return None


def _resolve_source(path: str, where: str, ctx: _Ctx) -> str:
    """Classify a data path (synthetic / local / hub); return its normalised form."""
    if path.startswith("synthetic:"):
        _check_synthetic(path, where, ctx.errs)
        return path
    if not path.strip():
        ctx.errs.add(where, "must not be empty")
        return path
    local = _resolve(path, ctx.base_dir)
    if local.exists():
        if ctx.check_files:
            _check_local(local, where, ctx.errs)
        return str(local)
    if _looks_like_path(path):
        if ctx.check_files:
            ctx.errs.add(where, f"no such file or directory: {local}")
        return str(local)
    first = _existing_first_part(path, ctx.base_dir)
    if first is not None:  # `mydata/train` with mydata/ here is a mistyped local path, not a hub dataset
        if ctx.check_files:
            ctx.errs.add(where, f"no such file or directory: {local} ({first} exists, so {path!r} is read as a "
                                "local path, not as a hub dataset)")
        return str(local)
    if _HUB_RE.fullmatch(path):
        return path  # a Hugging Face hub dataset; resolved (and possibly downloaded) by the data module
    if ctx.check_files:
        ctx.errs.add(where, f"{path!r} is neither an existing local path nor a hub dataset name (owner/name)")
    return str(local)


def _resolve_tokens(path: str, fmt: str, where: str, ctx: _Ctx) -> str:
    """A pre-tokenized source: a megatron PREFIX (PREFIX.idx + PREFIX.bin) or a numpy file."""
    local = _resolve(path, ctx.base_dir)
    files = [Path(f"{local}.idx"), Path(f"{local}.bin")] if fmt == "megatron" else [local]
    missing = [str(f) for f in files if not f.is_file()]
    if ctx.check_files and missing:
        what = "a megatron dataset is PREFIX.idx + PREFIX.bin" if fmt == "megatron" else "a numpy token file"
        ctx.errs.add(where, f"no such file: {', '.join(missing)} ({what})")
    return str(local)


def _check_source(src: DataSource, blk: _Block, ctx: _Ctx) -> None:
    ctx.errs.check(src.weight > 0, blk.where("weight"), f"must be > 0, got {src.weight}")
    if src.format not in DATA_FORMATS:
        ctx.errs.add(blk.where("format"), f"expected one of {', '.join(DATA_FORMATS)}, got {src.format!r}")
    elif src.format != "text":
        if src.format == "numpy" and src.dtype not in TOKEN_DTYPES:
            ctx.errs.add(blk.where("dtype"), f"a numpy token file needs dtype: one of {', '.join(TOKEN_DTYPES)}, "
                                             f"got {src.dtype!r}")
        if src.format == "megatron" and src.dtype is not None:
            ctx.errs.add(blk.where("dtype"), "a megatron dataset records its dtype in its .idx: leave dtype out")
        src.path = blk.data["path"] = _resolve_tokens(src.path, src.format, blk.where("path"), ctx)
        if src.heldout is not None:
            src.heldout = blk.data["heldout"] = _resolve_tokens(src.heldout, src.format, blk.where("heldout"), ctx)
        return
    elif src.dtype is not None:
        ctx.errs.add(blk.where("dtype"), "only a format: numpy source has a dtype")
    src.path = blk.data["path"] = _resolve_source(src.path, blk.where("path"), ctx)
    if src.heldout is not None:
        src.heldout = blk.data["heldout"] = _resolve_source(src.heldout, blk.where("heldout"), ctx)
    ctx.errs.check(bool(src.text_field), blk.where("text_field"), "must not be empty")
    ctx.errs.check(bool(src.split), blk.where("split"), "must not be empty")


def _check_resources(res: dict[str, Any], path: str, errs: _Errors) -> None:
    for key in ("nodes", "gpus_per_node", "cpus_per_task"):
        if key in res:
            ok = _is_number(res[key]) and float(res[key]).is_integer() and res[key] >= 1
            errs.check(ok, f"{path}.{key}", f"must be a positive integer, got {res[key]!r}")
    if "time" in res:
        # Unquoted 24:00:00 is a base-60 *integer* (86400) in YAML 1.1, which SLURM would read as minutes.
        errs.check(
            isinstance(res["time"], str), f"{path}.time", f'must be a quoted string like "24:00:00", got {res["time"]!r}'
        )
    for key in ("partition", "account"):
        if key in res:
            errs.check(isinstance(res[key], str), f"{path}.{key}", f"expected a string, got {res[key]!r}")
    if "sbatch_args" in res:
        v = res["sbatch_args"]
        ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(a, str) for a in v))
        errs.check(ok, f"{path}.sbatch_args", "expected a string or a list of strings")


def _build_data(own: Mapping[str, Any], dflt: Mapping[str, Any], label: str, ctx: _Ctx) -> tuple[list[DataSource], Any]:
    errs = ctx.errs
    if "data" in own:
        items, path = copy.deepcopy(own["data"]), f"{label}.data"
    else:
        items, path = copy.deepcopy(dflt.get("data")), "defaults.data"
    if items is None or (isinstance(items, list) and not items):
        errs.add(f"{label}.data", "missing or empty data (list at least one source)")
        return [], items
    if not isinstance(items, list):
        errs.add(path, f"expected a list of data sources, got {type(items).__name__}")
        return [], items
    sources: list[DataSource] = []
    for j, item in enumerate(items):
        where = f"{path}[{j}]"
        if isinstance(item, str):  # shorthand: `- synthetic:level0`
            item = items[j] = {"path": item}
        if not isinstance(item, Mapping):
            errs.add(where, f"expected a mapping with a 'path', got {type(item).__name__}")
            continue
        item = items[j] = dict(item)
        _check_keys(item, _field_names(DataSource), where, errs)
        src = _section(DataSource, _Block(item, where), ctx, _check_source)
        if src is not None:
            sources.append(src)
    return sources, items
