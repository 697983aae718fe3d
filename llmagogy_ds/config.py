"""Typed curriculum configuration: YAML -> validated dataclasses, before any compute runs.

A run is an ordered list of *stages*; each stage has its own corpus, model shape and
training hyper-parameters.  ``defaults`` is deep-merged under every stage (stage wins).

Everything that can be checked without touching a GPU is checked here, and *all* problems
are reported at once in a single :class:`ConfigError`, one per line, each naming the key
path (e.g. ``stages[1] (primary).model.hidden``) -- a typo in stage 12 should not surface
after eleven stages of training.
"""

import copy
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, get_args, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "RunConfig",
    "TokenizerConfig",
    "WandbConfig",
    "ModelConfig",
    "TrainConfig",
    "DataSource",
    "GrowthConfig",
    "FreezeConfig",
    "StageConfig",
    "EvalConfig",
    "BaselineConfig",
    "CurriculumConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "approx_params",
    "DATA_EXTENSIONS",
]

DATA_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl", ".json", ".parquet")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = ("online", "offline", "disabled")
GROWTH_DEPTHS = ("identity", "stack")
GROWTH_PLACEMENTS = ("top", "bottom", "interleave")
GROWTH_INITS = ("mirror", "zero")
RESOURCE_KEYS = ("nodes", "gpus_per_node", "cpus_per_task", "time", "partition", "account", "sbatch_args")
# Byte-level BPE starts from 256 byte tokens and needs room for special tokens and merges.
MIN_VOCAB_SIZE = 300

TOP_KEYS = ("run", "tokenizer", "wandb", "defaults", "stages", "vars", "eval", "baseline")
STAGE_KEYS = ("name", "data", "model", "train", "growth", "freeze", "resources")
DEFAULT_KEYS = ("model", "train", "growth", "freeze", "data", "resources")

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SYNTHETIC_RE = re.compile(r"synthetic:level(\d+)")
# `owner/name` or `name`, as on the Hugging Face hub.
_HUB_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# PyYAML (YAML 1.1) reads `1e-3` as a *string*; we accept such numeric strings for numbers.
_NUMBER_RE = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """Invalid configuration.  ``errors`` holds one ``"key.path: reason"`` line per problem."""

    def __init__(self, errors: str | Sequence[str], source: str | None = None) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        if len(self.errors) == 1:
            message = f"{head}: {self.errors[0]}"
        else:
            message = f"{head} ({len(self.errors)} errors):\n" + "\n".join(f"  {e}" for e in self.errors)
        super().__init__(message)


# --------------------------------------------------------------------------- dataclasses


@dataclass
class RunConfig:
    name: str
    seed: int = 1234


@dataclass
class TokenizerConfig:
    """Exactly one of ``vocab_size`` (train byte-level BPE on the curriculum) or ``path``."""

    vocab_size: int | None = None
    path: str | None = None
    min_frequency: int = 2
    max_train_bytes: int = 50_000_000


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "llmagogy"
    entity: str | None = None
    group: str | None = None


@dataclass
class ModelConfig:
    layers: int
    hidden: int
    heads: int
    ffn: int
    head_dim: int = 16
    seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    micro_batch: int = 8
    grad_accum: int = 1
    zero_stage: int = 2
    nproc: int = 1
    tp: int = 1
    pp: int = 1
    precision: str = "fp32"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    tokens: int | None = None
    epochs: float | None = None
    eval_every: int = 100
    eval_tokens: int = 65536
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    peak_tflops: float | None = None
    log_every: int = 10

    @property
    def dp(self) -> int:
        """Data-parallel degree: the processes left after tensor and pipeline parallelism."""
        return self.nproc // (self.tp * self.pp)

    @property
    def global_batch_sequences(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    def steps_for(self, seq_len: int, epoch_tokens: int) -> int:
        """Optimizer steps of the stage: whole steps of the global batch until ``tokens``, or
        ``epochs`` × ``epoch_tokens`` (the tokens of one pass over its training windows)."""
        target = self.tokens if self.tokens is not None else int(self.epochs * epoch_tokens)
        return max(1, -(-target // (self.global_batch_sequences * seq_len)))


def _looks_like_path(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix.lower() in DATA_EXTENSIONS


@dataclass
class DataSource:
    """One corpus of a stage.  After loading, local paths are absolute."""

    path: str
    weight: float = 1.0
    heldout: str | None = None
    text_field: str = "text"
    split: str = "train"
    name: str | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.path.startswith("synthetic:")

    @property
    def is_local(self) -> bool:
        return not self.is_synthetic and (_looks_like_path(self.path) or os.path.exists(self.path))

    @property
    def is_hub(self) -> bool:
        return not self.is_synthetic and not self.is_local

    @property
    def synthetic_level(self) -> int | None:
        m = _SYNTHETIC_RE.fullmatch(self.path)
        return int(m.group(1)) if m else None


@dataclass
class GrowthConfig:
    depth: str = "identity"
    placement: str = "interleave"
    init: str = "mirror"
    optimizer: str = "carry"  # carry the Adam moments of old parameters into the stage, or reset them


@dataclass
class FreezeConfig:
    """The freeze coefficient F applied to every earlier generation at a stage transition."""

    value: float = 1.0
    auto: bool = False
    drift_budget: float | None = None


@dataclass
class StageConfig:
    name: str
    data: list[DataSource]
    model: ModelConfig
    train: TrainConfig
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    # Free-form for a later SLURM launcher; only the keys in RESOURCE_KEYS are accepted.
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """``eval:`` -- scoring of each stage's final model (``exams.evaluate_run``), kept in the stage's
    result.json and summary.json. Paths are absolute after loading."""

    exams: list[str] = field(default_factory=list)  # multiple-choice JSONL files or directories
    pairs: list[str] = field(default_factory=list)  # minimal pairs (BLiMP/Zorro JSONL), files or directories
    texts: list[str] = field(default_factory=list)  # text files: loss and bits per byte
    every_stage: bool = True


@dataclass
class BaselineConfig:
    """``baseline:`` -- the from-scratch comparison run (``llmagogy baseline``).

    ``data`` None: every stage's sources, weighted by the tokens the curriculum trains on each.
    ``tokens`` None: ``compute_factor`` x the curriculum's FLOPs. ``train``: the final stage's
    train block with these keys replaced (merged and checked as ``train``).
    """

    data: list[DataSource] | None = None
    tokens: int | None = None
    compute_factor: float = 1.0
    train: TrainConfig | None = None


@dataclass
class CurriculumConfig:
    run: RunConfig
    tokenizer: TokenizerConfig
    stages: list[StageConfig]
    wandb: WandbConfig = field(default_factory=WandbConfig)
    source_path: str | None = None
    # Fully merged (defaults folded into each stage), override-applied, normalised plain dict;
    # self-contained, so a copy frozen into the run directory reloads to the same config.
    raw: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig | None = None  # None: no scoring beyond the built-in exams at stage ends
    baseline: BaselineConfig | None = None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False, default_flow_style=False)

    def stage_index(self, name: str) -> int:
        for i, stage in enumerate(self.stages):
            if stage.name == name:
                return i
        raise KeyError(f"no stage named {name!r} (stages: {', '.join(s.name for s in self.stages)})")

    def stage(self, name: str) -> StageConfig:
        return self.stages[self.stage_index(name)]


def approx_params(model: ModelConfig, vocab: int) -> int:
    """Rough parameter count: untied embeddings + attention (4 projections) + SwiGLU (3) + norms."""
    h, attn = model.hidden, model.heads * model.head_dim
    per_layer = 4 * h * attn + 3 * h * model.ffn + 2 * h
    return 2 * vocab * h + model.layers * per_layer + h


# --------------------------------------------------------------------------- error plumbing


class _Errors:
    """Ordered, de-duplicated error lines (a bad inherited default would repeat per stage)."""

    def __init__(self) -> None:
        self._lines: dict[str, None] = {}

    def add(self, where: str, reason: str) -> None:
        self._lines[f"{where}: {reason}" if where else reason] = None

    def check(self, cond: bool, where: str, reason: str) -> None:
        if not cond:
            self.add(where, reason)

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


# --------------------------------------------------------------------------- per-section checks


def _check_name(name: str, where: str, errs: _Errors) -> None:
    # Names become directory and checkpoint names.
    errs.check(bool(_NAME_RE.fullmatch(name)), where, f"{name!r} must match [A-Za-z0-9_.-]+")


def _check_run(run: RunConfig, blk: _Block, ctx: _Ctx) -> None:
    _check_name(run.name, blk.where("name"), ctx.errs)
    ctx.errs.check(run.seed >= 0, blk.where("seed"), "must be >= 0")


def _check_tokenizer(tok: TokenizerConfig, blk: _Block, ctx: _Ctx) -> None:
    errs = ctx.errs
    if (tok.vocab_size is None) == (tok.path is None):
        errs.add(blk.path, "set exactly one of vocab_size (train BPE on the curriculum) or path (tokenizer.json)")
    if tok.vocab_size is not None:
        errs.check(
            tok.vocab_size >= MIN_VOCAB_SIZE,
            blk.where("vocab_size"),
            f"must be >= {MIN_VOCAB_SIZE} (byte-level BPE needs 256 byte tokens + specials), got {tok.vocab_size}",
        )
    if tok.path is not None:
        resolved = _resolve(tok.path, ctx.base_dir)
        if ctx.check_files and not resolved.is_file():
            errs.add(blk.where("path"), f"tokenizer file not found: {resolved}")
        tok.path = blk.data["path"] = str(resolved)
    errs.check(tok.min_frequency >= 1, blk.where("min_frequency"), "must be >= 1")
    errs.check(tok.max_train_bytes >= 1, blk.where("max_train_bytes"), "must be >= 1")


def _check_wandb(wb: WandbConfig, blk: _Block, ctx: _Ctx) -> None:
    _one_of(wb.mode, WANDB_MODES, blk.where("mode"), ctx.errs)
    ctx.errs.check(bool(wb.project), blk.where("project"), "must not be empty")


def _check_model(m: ModelConfig, blk: _Block, ctx: _Ctx) -> None:
    errs = ctx.errs
    for key in ("layers", "hidden", "heads", "ffn", "head_dim", "seq_len"):
        errs.check(getattr(m, key) >= 1, blk.where(key), f"must be a positive integer, got {getattr(m, key)}")
    if m.head_dim >= 1:
        errs.check(m.head_dim % 2 == 0, blk.where("head_dim"), f"must be even (RoPE rotates pairs), got {m.head_dim}")
    if m.heads >= 1 and m.head_dim >= 1 and m.hidden != m.heads * m.head_dim:
        errs.add(
            blk.at("hidden"),
            f"must equal heads x head_dim = {m.heads} x {m.head_dim} = {m.heads * m.head_dim}, got {m.hidden}",
        )
    for key in ("rope_theta", "norm_eps", "init_std"):
        errs.check(getattr(m, key) > 0, blk.where(key), "must be > 0")


def _check_train(t: TrainConfig, blk: _Block, ctx: _Ctx) -> None:
    errs = ctx.errs
    w = blk.where
    errs.check(t.lr > 0, w("lr"), "must be > 0")
    errs.check(0.0 <= t.min_lr_ratio <= 1.0, w("min_lr_ratio"), "must be in [0, 1]")
    errs.check(t.warmup_steps >= 0, w("warmup_steps"), "must be >= 0")
    _one_of(t.schedule, SCHEDULES, w("schedule"), errs)
    _one_of(t.precision, PRECISIONS, w("precision"), errs)
    _one_of(t.zero_stage, ZERO_STAGES, w("zero_stage"), errs)
    positive = ("micro_batch", "grad_accum", "nproc", "tp", "pp", "eval_every", "eval_tokens",
                "checkpoint_every", "keep_checkpoints", "log_every")  # fmt: skip
    for key in positive:
        errs.check(getattr(t, key) >= 1, w(key), f"must be a positive integer, got {getattr(t, key)}")
    errs.check(t.weight_decay >= 0, w("weight_decay"), "must be >= 0")
    errs.check(0.0 <= t.beta1 < 1.0, w("beta1"), "must be in [0, 1)")
    errs.check(0.0 <= t.beta2 < 1.0, w("beta2"), "must be in [0, 1)")
    errs.check(t.eps > 0, w("eps"), "must be > 0")
    errs.check(t.grad_clip >= 0, w("grad_clip"), "must be >= 0 (0 disables clipping)")
    if t.peak_tflops is not None:
        errs.check(t.peak_tflops > 0, w("peak_tflops"), "must be > 0")
    # Budget: after merging defaults, a stage must say how long it trains, and only one way.
    if t.tokens is None and t.epochs is None:
        errs.add(blk.path, "set exactly one of tokens or epochs (neither is set)")
    elif t.tokens is not None and t.epochs is not None:
        errs.add(blk.path, "set exactly one of tokens or epochs (both are set; use null to drop an inherited one)")
    if t.tokens is not None:
        errs.check(t.tokens > 0, w("tokens"), "must be > 0")
    if t.epochs is not None:
        errs.check(t.epochs > 0, w("epochs"), "must be > 0")
    if t.tp >= 1 and t.pp >= 1 and t.nproc >= 1:
        errs.check(
            t.nproc % (t.tp * t.pp) == 0,
            blk.at("nproc"),
            f"must be divisible by tp x pp = {t.tp * t.pp}, got {t.nproc}",
        )
    # DeepSpeed's pipeline engine refuses ZeRO-2/3 (gradient partitioning conflicts with PP).
    if t.pp > 1 and t.zero_stage > 1:
        errs.add(blk.at("zero_stage"), f"pipeline parallel (pp={t.pp}) requires zero_stage <= 1, got {t.zero_stage}")
    # ZeRO-3 partitions the parameters the tensor-parallel layers slice themselves
    if t.tp > 1 and t.zero_stage > 2:
        errs.add(blk.at("zero_stage"), f"tensor parallel (tp={t.tp}) requires zero_stage <= 2, got {t.zero_stage}")


def _check_growth(g: GrowthConfig, blk: _Block, ctx: _Ctx) -> None:
    _one_of(g.depth, GROWTH_DEPTHS, blk.where("depth"), ctx.errs)
    _one_of(g.placement, GROWTH_PLACEMENTS, blk.where("placement"), ctx.errs)
    _one_of(g.init, GROWTH_INITS, blk.where("init"), ctx.errs)
    _one_of(g.optimizer, ("carry", "reset"), blk.where("optimizer"), ctx.errs)


def _check_freeze(f: FreezeConfig, blk: _Block, ctx: _Ctx) -> None:
    ctx.errs.check(0.0 <= f.value <= 1.0, blk.where("value"), f"F must be in [0, 1], got {f.value}")
    if f.drift_budget is not None:
        ctx.errs.check(f.drift_budget > 0, blk.where("drift_budget"), "must be > 0")
    if f.auto and f.drift_budget is None:
        ctx.errs.add(blk.at("drift_budget"), "auto: true requires a drift_budget > 0")


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base_dir / p).resolve()


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
    try:  # written by another module; skip the range check until it exists
        from llmagogy_ds.synthetic import LEVELS  # type: ignore[attr-defined]
    except ImportError:
        return
    if isinstance(LEVELS, int):
        known = level < LEVELS
    elif isinstance(LEVELS, Mapping):
        known = level in LEVELS or f"level{level}" in LEVELS
    else:
        known = level < len(LEVELS)
    errs.check(known, where, f"unknown synthetic level {level} (see llmagogy_ds.synthetic.LEVELS)")


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
    if _HUB_RE.fullmatch(path):
        return path  # a Hugging Face hub dataset; resolved (and possibly downloaded) by the data module
    if ctx.check_files:
        ctx.errs.add(where, f"{path!r} is neither an existing local path nor a hub dataset name (owner/name)")
    return str(local)


def _check_source(src: DataSource, blk: _Block, ctx: _Ctx) -> None:
    ctx.errs.check(src.weight > 0, blk.where("weight"), f"must be > 0, got {src.weight}")
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


# --------------------------------------------------------------------------- stages


def _stage_label(i: int, stage: Any) -> str:
    name = stage.get("name") if isinstance(stage, Mapping) else None
    return f"stages[{i}] ({name})" if isinstance(name, str) and name else f"stages[{i}]"


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


def _merged_block(
    key: str, cls: type, own: Mapping[str, Any], dflt: Mapping[str, Any], label: str, ctx: _Ctx, check: _Checker
) -> tuple[Any | None, dict[str, Any] | None]:
    """Deep-merge ``defaults.<key>`` under the stage's ``<key>`` and build ``cls`` from it."""
    value = own.get(key)
    if key == "freeze":
        value = _normalize_freeze(value)
    own_block = _mapping(value, f"{label}.{key}", ctx.errs)
    if own_block is None:
        return None, None
    _check_keys(own_block, _field_names(cls), f"{label}.{key}", ctx.errs)
    merged = _deep_merge(dflt.get(key, {}), own_block)
    blk = _Block(merged, f"{label}.{key}", own_block, f"defaults.{key}")
    return _section(cls, blk, ctx, check), merged


def _build_stage(
    i: int, own: Mapping[str, Any], dflt: Mapping[str, Any], ctx: _Ctx
) -> tuple[StageConfig | None, dict[str, Any]]:
    errs = ctx.errs
    label = _stage_label(i, own)
    _check_keys(own, STAGE_KEYS, label, errs)

    name = own.get("name")
    if name is None:
        errs.add(f"{label}.name", "missing required key")
    elif not isinstance(name, str):
        errs.add(f"{label}.name", f"expected a string, got {name!r}")
    else:
        _check_name(name, f"{label}.name", errs)

    data, data_raw = _build_data(own, dflt, label, ctx)
    model, model_raw = _merged_block("model", ModelConfig, own, dflt, label, ctx, _check_model)
    train, train_raw = _merged_block("train", TrainConfig, own, dflt, label, ctx, _check_train)
    merged: dict[str, Any] = {"name": name, "data": data_raw, "model": model_raw, "train": train_raw}

    growth, freeze = GrowthConfig(), FreezeConfig()
    if i == 0:
        # Defaults' growth/freeze describe transitions, so they apply from stage 1 on.
        if own.get("growth") is not None:
            errs.add(f"{label}.growth", "stage 0 has nothing to grow from")
        if own.get("freeze") is not None:
            errs.add(f"{label}.freeze", "stage 0 has nothing to freeze")
    else:
        if "growth" in own or "growth" in dflt:
            growth, merged["growth"] = _merged_block("growth", GrowthConfig, own, dflt, label, ctx, _check_growth)
        if "freeze" in own or "freeze" in dflt:
            freeze, merged["freeze"] = _merged_block("freeze", FreezeConfig, own, dflt, label, ctx, _check_freeze)

    resources: dict[str, Any] | None = {}
    if "resources" in own or "resources" in dflt:
        own_res = _mapping(own.get("resources"), f"{label}.resources", errs)
        if own_res is not None:
            _check_keys(own_res, RESOURCE_KEYS, f"{label}.resources", errs)
            resources = merged["resources"] = _deep_merge(dflt.get("resources", {}), own_res)
            _check_resources(resources, f"{label}.resources", errs)

    # Shape-dependent parallelism limits (Megatron splits heads and FFN columns across TP ranks).
    if model is not None and train is not None:
        if train.tp > 1:
            for key in ("heads", "ffn"):
                errs.check(
                    getattr(model, key) % train.tp == 0,
                    f"{label}.train.tp",
                    f"model.{key}={getattr(model, key)} is not divisible by tp={train.tp}",
                )
        if train.pp > 1:
            errs.check(train.pp <= model.layers, f"{label}.train.pp", f"pp={train.pp} exceeds layers={model.layers}")
        if train.tokens is not None and train.dp >= 1:
            step_tokens = train.global_batch_sequences * model.seq_len
            errs.check(
                train.tokens >= step_tokens,
                f"{label}.train.tokens",
                f"{train.tokens} is less than one optimizer step ({step_tokens} tokens)",
            )

    if (
        model is None or train is None or growth is None or freeze is None or resources is None
        or not isinstance(name, str) or not data
    ):  # fmt: skip
        return None, merged
    stage = StageConfig(name, data, model, train, growth, freeze, dict(resources))
    return stage, merged


# --------------------------------------------------------------------------- eval and baseline

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


_SHRINK_WHAT = {"layers": "layers", "hidden": "width", "heads": "heads", "ffn": "FFN units"}


def _check_tp_pieces(stages: list[tuple[int, StageConfig | None]], errs: _Errors) -> None:
    """Tensor parallelism splits every generation's piece on its own: the heads and FFN units
    each earlier stage added must divide by a stage's tp (parallel/tensor_parallel.py)."""
    for n, (i, cur) in enumerate(stages):
        if cur is None or cur.train.tp == 1:
            continue
        prev_h = prev_f = 0
        for _, st in stages[: n + 1]:
            if st is None:
                break
            for key, before, what in (("heads", prev_h, "heads"), ("ffn", prev_f, "FFN units")):
                added = getattr(st.model, key) - before
                if added > 0 and added % cur.train.tp:
                    errs.add(f"stages[{i}] ({cur.name}).train.tp",
                             f"stage {st.name} adds {added} {what}, not divisible by tp={cur.train.tp} "
                             "(each generation's piece is split across the TP ranks on its own)")
            prev_h, prev_f = st.model.heads, st.model.ffn


def _check_across_stages(stages: list[tuple[int, StageConfig | None]], errs: _Errors) -> None:
    _check_tp_pieces(stages, errs)
    for (_, prev), (i, cur) in zip(stages, stages[1:]):
        if prev is None or cur is None:
            continue
        label = f"stages[{i}] ({cur.name})"
        for key, what in _SHRINK_WHAT.items():
            before, after = getattr(prev.model, key), getattr(cur.model, key)
            errs.check(
                after >= before,
                f"{label}.model.{key}",
                f"shrinks from {before} to {after}: growth cannot remove {what}",
            )
        if cur.model.head_dim != prev.model.head_dim:
            errs.add(
                f"{label}.model.head_dim",
                f"changes from {prev.model.head_dim} to {cur.model.head_dim}: head_dim must stay constant "
                "(width growth adds heads of a fixed head_dim)",
            )


# --------------------------------------------------------------------------- variables

_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `${name}` or `${name:-default}` (the default runs to the first closing brace)
_VAR_REF_RE = re.compile(r"\$\{([^}]*?)(?::-([^}]*))?\}")


def _substitute_vars(raw: dict[str, Any], errs: _Errors) -> dict[str, Any]:
    """Expand ``${name}`` and ``${name:-default}`` in every string value (keys are left alone).

    ``name`` is looked up in the top-level ``vars`` mapping (after ``--set``, so
    ``--set vars.corpus_root=/data`` works; a var may use other vars), then in the environment,
    then the default. An undefined name is an error naming it and the key that uses it. The
    result has no ``vars`` key: a run's frozen config keeps the expanded values, so resuming
    does not depend on the environment of the day.
    """
    raw = dict(raw)
    table = _mapping(raw.pop("vars", None), "vars", errs) or {}
    bad: set[str] = set()
    for name, value in table.items():
        if not isinstance(name, str) or not _VAR_NAME_RE.fullmatch(name):
            errs.add(f"vars.{name}", "a variable name must match [A-Za-z_][A-Za-z0-9_]*")
            bad.add(str(name))
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errs.add(f"vars.{name}", f"must be a string or a number, got {type(value).__name__} {value!r}")
            bad.add(name)
    done: dict[str, str | None] = {}

    def lookup(name: str, default: str | None, where: str, chain: tuple[str, ...]) -> str | None:
        if name in table:
            if name in bad:
                return None  # already reported at vars.<name>
            if name in chain:
                errs.add(f"vars.{name}", "circular reference: " + " -> ".join((*chain, name)))
                return None
            if name not in done:
                done[name] = expand(str(table[name]), f"vars.{name}", (*chain, name))
            return done[name]
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        errs.add(where, f"undefined variable ${{{name}}}: define it under vars (or --set vars.{name}=VALUE), "
                        f"or set the environment variable {name}")
        return None

    def expand(text: str, where: str, chain: tuple[str, ...]) -> str | None:
        ok = True

        def one(m: re.Match) -> str:
            nonlocal ok
            name, default = m.group(1), m.group(2)
            value = None
            if not _VAR_NAME_RE.fullmatch(name):
                errs.add(where, f"bad variable reference {m.group(0)!r} (expected ${{name}} or ${{name:-default}})")
            else:
                value = lookup(name, default, where, chain)
            ok = ok and value is not None
            return m.group(0) if value is None else value

        out = _VAR_REF_RE.sub(one, text)
        if "${" in _VAR_REF_RE.sub("", text):
            errs.add(where, f"unterminated variable reference in {text!r} (missing '}}')")
            ok = False
        return out if ok else None

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, str):
            if "${" not in node:
                return node
            out = expand(node, path, ())
            return node if out is None else out
        if isinstance(node, Mapping):
            return {k: walk(v, _join(path, k)) for k, v in node.items()}
        if isinstance(node, list):
            label = _stage_label if path == "stages" else (lambda i, _v: f"{path}[{i}]")
            return [walk(v, label(i, v)) for i, v in enumerate(node)]
        return node

    return walk(raw, "")


# --------------------------------------------------------------------------- public entry points


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
    eval_cfg = None
    if "eval" in raw:
        eval_cfg, out["eval"] = _build_eval(raw["eval"], ctx)

    # Defaults: unknown keys are reported here, once; values are checked as merged into stages.
    defaults = _mapping(raw.get("defaults"), "defaults", errs) or {}
    _check_keys(defaults, DEFAULT_KEYS, "defaults", errs)
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
            block = _mapping(value, f"defaults.{key}", errs)
            if block is not None:
                _check_keys(block, allowed, f"defaults.{key}", errs)
                dflt[key] = block
    if "data" in defaults:
        dflt["data"] = defaults["data"]

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
    return CurriculumConfig(run, tokenizer, stages, wandb, source_path, out, eval=eval_cfg, baseline=baseline)


def _parse_override_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # e.g. `run.name=a: b` -- take it literally
    return _to_number(value) if isinstance(value, str) else value


def _find_stage(stages: list[Any], rest: str) -> tuple[int, str] | None:
    """Match ``NAME.key...`` (names may contain dots: longest match wins) or ``INDEX.key...``."""
    best: tuple[int, str] | None = None
    for idx, stage in enumerate(stages):
        name = stage.get("name") if isinstance(stage, Mapping) else None
        if isinstance(name, str) and (rest == name or rest.startswith(name + ".")):
            if best is None or len(name) > len(best[1]):
                best = (idx, name)
    if best is not None:
        return best[0], rest[len(best[1]) + 1 :]
    head, _, tail = rest.partition(".")
    if head.isdigit() and int(head) < len(stages):
        return int(head), tail
    return None


def _set_override(root: dict[str, Any], key: str, value: Any) -> None:
    node: Any = root
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        stages = root.get("stages")
        if not isinstance(stages, list):
            raise ValueError("the config has no stages list")
        found = _find_stage(stages, key[len("stages.") :])
        if found is None:
            names = [s.get("name") for s in stages if isinstance(s, Mapping)]
            raise ValueError(f"no stage named {parts[1]!r} (stages: {', '.join(map(str, names))})")
        idx, rest = found
        if not rest:
            raise ValueError("must name a key inside the stage, e.g. stages.NAME.train.lr")
        node, parts = stages[idx], rest.split(".")
    if any(not p for p in parts):
        raise ValueError("empty key segment")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ValueError(f"{part!r} is not an index of a list of {len(node)}")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ValueError(f"cannot set a key under a {type(node).__name__} value")
        if node.get(part) is None:
            node[part] = {}  # create intermediate mappings
        elif part == "freeze":
            node[part] = _normalize_freeze(node[part])  # `freeze: 0.5` then `freeze.auto=true`
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ValueError(f"{last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"cannot set a key under a {type(node).__name__} value")


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.path=value`` overrides applied (values parsed as YAML).

    ``stages.NAME.…`` (or ``stages.INDEX.…``) addresses one stage; ``defaults.…`` reaches every
    stage that does not set the key itself.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(dict(raw))
    errs = _Errors()
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            errs.add(f"override {override!r}", "expected the form key.path=value")
            continue
        try:
            _set_override(out, key, _parse_override_value(text.strip()))
        except ValueError as exc:
            errs.add(f"override {override!r}", str(exc))
    errs.raise_if_any()
    return out


def load_config(
    path: str | Path, overrides: Iterable[str] = (), check_files: bool = True
) -> CurriculumConfig:
    """Read a YAML curriculum, apply ``--set`` overrides, merge defaults, build and validate."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
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
