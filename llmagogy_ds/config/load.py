"""The entry points: a YAML file or a plain dict -> a validated CurriculumConfig."""

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from llmagogy_ds.config.checks import _check_export, _check_run, _check_tokenizer, _check_wandb
from llmagogy_ds.config.coerce import (
    _Block,
    _Checker,
    _check_keys,
    _Ctx,
    _Errors,
    _field_names,
    _mapping,
    _normalize_freeze,
    _section,
)
from llmagogy_ds.config.overrides import apply_overrides
from llmagogy_ds.config.schema import (
    DEFAULT_KEYS,
    RESOURCE_KEYS,
    TOP_KEYS,
    ConfigError,
    CurriculumConfig,
    DataSource,
    ExportConfig,
    FreezeConfig,
    GrowthConfig,
    ModelConfig,
    RunConfig,
    StageConfig,
    TokenizerConfig,
    TrainConfig,
    WandbConfig,
)
from llmagogy_ds.config.sections import _build_baseline, _build_eval
from llmagogy_ds.config.sources import _check_source
from llmagogy_ds.config.stages import _build_stage, _check_across_stages, _stage_label
from llmagogy_ds.config.variables import _substitute_vars


def _defaults(value: Any, errs: _Errors, where: str = "defaults") -> dict[str, Any]:
    """The ``defaults`` section as blocks to merge under each stage. Unknown keys are reported
    here, once; values are checked as merged into stages."""
    defaults = _mapping(value, where, errs) or {}
    _check_keys(defaults, DEFAULT_KEYS, where, errs)
    dflt: dict[str, Any] = {}
    for key, allowed in (
        ("model", _field_names(ModelConfig)),
        ("train", _field_names(TrainConfig)),
        ("growth", _field_names(GrowthConfig)),
        ("freeze", _field_names(FreezeConfig)),
        ("resources", RESOURCE_KEYS),
    ):
        if key in defaults:
            value = _normalize_freeze(defaults[key]) if key == "freeze" else defaults[key]
            block = _mapping(value, f"{where}.{key}", errs)
            if block is not None:
                _check_keys(block, allowed, f"{where}.{key}", errs)
                dflt[key] = block
    if "data" in defaults:
        dflt["data"] = defaults["data"]
    return dflt


def config_from_dict(
    raw: Mapping[str, Any], base_dir: str | Path, check_files: bool = True, source_path: str | None = None
) -> CurriculumConfig:
    """Build and validate a config from a plain dict (overrides already applied).

    Relative local paths are resolved against ``base_dir``.  ``check_files=False`` skips all
    filesystem checks (e.g. validating a cluster config on a laptop).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"top level: expected a mapping, got {type(raw).__name__}", source_path)
    raw = copy.deepcopy(dict(raw))
    errs = _Errors()
    ctx = _Ctx(Path(base_dir).expanduser().resolve(), check_files, errs)
    raw = _substitute_vars(raw, errs)  # before anything reads a value
    _check_keys(raw, TOP_KEYS, "", errs)
    out: dict[str, Any] = {}

    def top(key: str, cls: type, check: _Checker) -> Any | None:
        block = _mapping(raw.get(key), key, errs)
        if block is None:
            return None
        _check_keys(block, _field_names(cls), key, errs)
        out[key] = block
        return _section(cls, _Block(block, key), ctx, check)

    run = top("run", RunConfig, _check_run)
    tokenizer = top("tokenizer", TokenizerConfig, _check_tokenizer)
    wandb = top("wandb", WandbConfig, _check_wandb) if "wandb" in raw else WandbConfig()
    export = top("export", ExportConfig, _check_export) if "export" in raw else None
    eval_cfg = None
    if "eval" in raw:
        eval_cfg, out["eval"] = _build_eval(raw["eval"], ctx)

    dflt = _defaults(raw.get("defaults"), errs)
    stages_raw = raw.get("stages")
    built: list[tuple[int, StageConfig | None]] = []
    merged_stages: list[dict[str, Any]] = []
    if not isinstance(stages_raw, list) or not stages_raw:
        errs.add("stages", "at least one stage is required (a list of mappings)")
        stages_raw = stages_raw if isinstance(stages_raw, list) else []
    seen: dict[str, int] = {}
    for i, stage_raw in enumerate(stages_raw):
        if not isinstance(stage_raw, Mapping):
            errs.add(f"stages[{i}]", f"expected a mapping, got {type(stage_raw).__name__}")
            continue
        stage, merged = _build_stage(i, stage_raw, dflt, ctx)
        name = stage_raw.get("name")
        if isinstance(name, str):
            if name in seen:
                errs.add(f"{_stage_label(i, stage_raw)}.name", f"duplicate stage name (also stages[{seen[name]}])")
            seen.setdefault(name, i)
        built.append((i, stage))
        merged_stages.append(merged)
    _check_across_stages(built, errs)
    out["stages"] = merged_stages
    baseline = None
    if "baseline" in raw:
        final_raw = merged_stages[-1] if merged_stages and len(merged_stages) == len(stages_raw) else None
        label = _stage_label(len(stages_raw) - 1, stages_raw[-1]) if stages_raw else "stages"
        baseline, out["baseline"] = _build_baseline(raw["baseline"], ctx, final_raw, label)

    errs.raise_if_any(source_path)
    assert run is not None and tokenizer is not None and wandb is not None
    stages = [s for _, s in built if s is not None]
    return CurriculumConfig(run, tokenizer, stages, wandb, source_path, out, eval=eval_cfg, baseline=baseline,
                            export=export)


def load_config(
    path: str | Path, overrides: Iterable[str] = (), check_files: bool = True
) -> CurriculumConfig:
    """Read a YAML curriculum, apply ``--set`` overrides, merge defaults, build and validate."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: YAML syntax error: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    resolved = file.resolve()
    return config_from_dict(raw, resolved.parent, check_files, source_path=str(resolved))


def load_source(spec: str | Mapping[str, Any], base_dir: str | Path = ".", where: str = "--data") -> DataSource:
    """One data source as a stage's ``data:`` list takes it (a local path, a hub name,
    ``synthetic:levelN``, or a mapping with ``path``, ``text_field``, ...), resolved and checked
    like the config's; a ``ConfigError`` naming ``where`` (``llmagogy contrast --data``)."""
    errs = _Errors()
    ctx = _Ctx(Path(base_dir).expanduser().resolve(), True, errs)
    item = {"path": spec} if isinstance(spec, str) else dict(spec)
    _check_keys(item, _field_names(DataSource), where, errs)
    src = _section(DataSource, _Block(item, where), ctx, _check_source)
    errs.raise_if_any()
    assert src is not None
    return src
