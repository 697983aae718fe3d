"""The optional top-level ``eval:`` and ``baseline:`` sections."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmagogy_ds.config.checks import _check_train
from llmagogy_ds.config.coerce import (
    _Block,
    _check_keys,
    _coerce,
    _Ctx,
    _deep_merge,
    _Errors,
    _field_names,
    _mapping,
    _resolve,
    _section,
)
from llmagogy_ds.config.schema import BaselineConfig, EvalConfig, TrainConfig
from llmagogy_ds.config.sources import _build_data

_EVAL_LISTS = (("exams", "multiple-choice JSONL"), ("pairs", "minimal-pairs JSONL"), ("texts", "text"))
_BASELINE_LENGTH = ("tokens", "epochs")  # the baseline's length is baseline.tokens / compute_factor


def _check_eval_path(p: Path, key: str, where: str, errs: _Errors) -> None:
    # Existence only; the items themselves are read and checked when the run prepares its data.
    if key == "texts":
        if not p.is_file():
            errs.add(where, f"no such text file: {p}")
        elif p.stat().st_size == 0:
            errs.add(where, f"text file is empty: {p}")
    elif p.is_dir():
        if not any(f.is_file() for f in p.rglob("*.jsonl")):
            errs.add(where, f"directory has no .jsonl files: {p}")
    elif not p.is_file():
        errs.add(where, f"no such file or directory: {p}")
    elif p.stat().st_size == 0:
        errs.add(where, f"file is empty: {p}")


def _build_eval(value: Any, ctx: _Ctx) -> tuple[EvalConfig | None, dict[str, Any] | None]:
    errs = ctx.errs
    block = _mapping(value, "eval", errs)
    if block is None:
        return None, None
    _check_keys(block, _field_names(EvalConfig), "eval", errs)
    kwargs: dict[str, Any] = {}
    ok = True
    for key, what in _EVAL_LISTS:
        items = block.get(key)
        if items is None:
            items = []
        elif isinstance(items, str):  # a single path
            items = [items]
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            errs.add(f"eval.{key}", f"expected a list of {what} file paths, got {items!r}")
            ok = False
            continue
        paths = []
        for j, item in enumerate(items):
            p = _resolve(item, ctx.base_dir)
            if ctx.check_files:
                _check_eval_path(p, key, f"eval.{key}[{j}]", errs)
            paths.append(str(p))
        kwargs[key] = block[key] = paths
    if "every_stage" in block:
        good, kwargs["every_stage"] = _coerce(block["every_stage"], bool, "eval.every_stage", errs)
        ok = ok and good
    return (EvalConfig(**kwargs) if ok else None), block


def _build_baseline(
    value: Any, ctx: _Ctx, final_raw: Mapping[str, Any] | None, final_label: str
) -> tuple[BaselineConfig | None, dict[str, Any] | None]:
    """``baseline:``; ``final_raw`` is the final stage's merged block, whose ``train`` it inherits."""
    errs = ctx.errs
    block = _mapping(value, "baseline", errs)
    if block is None:
        return None, None
    _check_keys(block, _field_names(BaselineConfig), "baseline", errs)
    ok = True
    data = None
    if "data" in block:
        data, block["data"] = _build_data(block, {}, "baseline", ctx)
        ok = bool(data)
    tokens, factor = None, 1.0
    if block.get("tokens") is not None:
        good, tokens = _coerce(block["tokens"], int, "baseline.tokens", errs)
        if good:
            block["tokens"] = tokens
            errs.check(tokens > 0, "baseline.tokens", f"must be > 0, got {tokens}")
        ok = ok and good
        if "compute_factor" in block:
            errs.add("baseline", "set at most one of tokens or compute_factor (both are set)")
    if "compute_factor" in block:
        good, factor = _coerce(block["compute_factor"], float, "baseline.compute_factor", errs)
        if good:
            block["compute_factor"] = factor
            errs.check(factor >= 1.0, "baseline.compute_factor",
                       f"must be >= 1 (the baseline gets at least the curriculum's compute), got {factor}")
        ok = ok and good
    own = _mapping(block.get("train"), "baseline.train", errs)
    train = None
    if own is None:
        ok = False
    else:
        for key in _BASELINE_LENGTH:
            if key in own:
                errs.add(f"baseline.train.{key}", "the baseline's length is set by baseline.tokens or "
                                                  "baseline.compute_factor (x the curriculum's FLOPs)")
        own = {k: v for k, v in own.items() if k not in _BASELINE_LENGTH}
        _check_keys(own, [n for n in _field_names(TrainConfig) if n not in _BASELINE_LENGTH], "baseline.train", errs)
        final_train = final_raw.get("train") if final_raw is not None else None
        if isinstance(final_train, Mapping):
            merged = _deep_merge(final_train, own)
            train = _section(TrainConfig, _Block(merged, "baseline.train", own, f"{final_label}.train"), ctx,
                             _check_train)
            if "train" in block:
                block["train"] = {k: merged[k] for k in own}  # coerced values
        ok = ok and train is not None
    return (BaselineConfig(data, tokens, factor, train) if ok else None), block
