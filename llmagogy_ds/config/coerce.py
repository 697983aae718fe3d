"""Error collection and the generic YAML -> dataclass plumbing: key checks, merging, type
coercion, path resolution."""

import copy
import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable, get_args, get_type_hints

from llmagogy_ds.config.schema import ConfigError

# PyYAML (YAML 1.1) reads `1e-3` as a *string*; we accept such numeric strings for numbers.
_NUMBER_RE = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?")


class _Errors:
    """Ordered, de-duplicated error lines (a bad inherited default would repeat per stage)."""

    def __init__(self) -> None:
        self._lines: dict[str, None] = {}

    def add(self, where: str, reason: str) -> None:
        self._lines[f"{where}: {reason}" if where else reason] = None

    def check(self, cond: bool, where: str, reason: str) -> None:
        if not cond:
            self.add(where, reason)

    @property
    def lines(self) -> list[str]:
        return list(self._lines)

    def raise_if_any(self, source: str | None = None) -> None:
        if self._lines:
            raise ConfigError(list(self._lines), source)


@dataclass
class _Block:
    """A mapping being turned into a dataclass, plus where its keys live for error messages."""

    data: dict[str, Any]
    path: str
    own: Mapping[str, Any] | None = None  # the stage's own keys, when merged over defaults
    default_path: str | None = None  # e.g. "defaults.train"

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def where(self, key: str) -> str:
        # An inherited bad value is reported once, at its real location in `defaults`.
        if self.default_path is not None and self.own is not None and key not in self.own:
            return f"{self.default_path}.{key}"
        return self.at(key)


@dataclass
class _Ctx:
    base_dir: Path
    check_files: bool
    errs: _Errors


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _check_keys(mapping: Mapping[str, Any], allowed: Sequence[str], path: str, errs: _Errors) -> None:
    for key in mapping:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(allowed)}"
        errs.add(_join(path, key), f"unknown key '{key}' ({hint})")


def _mapping(value: Any, path: str, errs: _Errors) -> dict[str, Any] | None:
    if value is None:  # `train:` with nothing under it
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    errs.add(path, f"expected a mapping, got {type(value).__name__} {value!r}")
    return None


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _to_number(value: Any) -> Any:
    """Numeric strings -> int/float (PyYAML leaves `1e-3` as str); anything else unchanged."""
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return float(text)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(value: Any, tp: Any, where: str, errs: _Errors) -> tuple[bool, Any]:
    args = get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if value is None:
        if optional:
            return True, None
        errs.add(where, "must not be null")
        return False, None
    if base is bool:
        if isinstance(value, bool):
            return True, value
        errs.add(where, f"expected true or false, got {value!r}")
    elif base is int:
        num = _to_number(value)
        if _is_number(num) and float(num).is_integer():  # allow `tokens: 4.0e+5`
            return True, int(num)
        errs.add(where, f"expected an integer, got {value!r}")
    elif base is float:
        num = _to_number(value)
        if _is_number(num):
            if math.isfinite(num):
                return True, float(num)
            errs.add(where, f"must be a finite number, got {value!r}")
        else:
            errs.add(where, f"expected a number, got {value!r}")
    elif base is str:
        if isinstance(value, str):
            return True, value
        errs.add(where, f"expected a string, got {type(value).__name__} {value!r}")
    elif base is Any:  # a value of several forms (e.g. a string or a mapping): its section check reads it
        return True, value
    else:  # pragma: no cover - only simple field types are built generically
        raise TypeError(f"unsupported field type {tp!r}")
    return False, None


def _build(cls: type, blk: _Block, errs: _Errors) -> Any | None:
    """Type-check and coerce the known fields of ``blk.data`` into ``cls``; None on any error.

    Coerced values are written back so that ``CurriculumConfig.raw`` holds clean types.
    Unknown keys are the caller's business (they are reported where they were written).
    """
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    ok = True
    for f in fields(cls):
        if f.name not in blk.data:
            if f.default is MISSING and f.default_factory is MISSING:
                errs.add(blk.at(f.name), "missing required key")
                ok = False
            continue
        good, value = _coerce(blk.data[f.name], hints[f.name], blk.where(f.name), errs)
        if good:
            kwargs[f.name] = value
            blk.data[f.name] = value
        else:
            ok = False
    return cls(**kwargs) if ok else None


def _one_of(value: Any, choices: Iterable[Any], where: str, errs: _Errors) -> None:
    choices = tuple(choices)
    errs.check(value in choices, where, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base_dir / p).resolve()


_Checker = Callable[[Any, _Block, _Ctx], None]


def _section(cls: type, blk: _Block, ctx: _Ctx, check: _Checker) -> Any | None:
    obj = _build(cls, blk, ctx.errs)
    if obj is not None:
        check(obj, blk, ctx)
    return obj


def _normalize_freeze(value: Any) -> Any:
    """`freeze: 0.5` is shorthand for `freeze: {value: 0.5}` (normalised before merging)."""
    num = _to_number(value)
    return {"value": num} if _is_number(num) else value
