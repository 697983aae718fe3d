"""The config's schema: the dataclasses a curriculum YAML becomes, the allowed values and keys,
and ConfigError."""

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl", ".json", ".parquet")
DATA_FORMATS = ("text", "megatron", "numpy")  # of a data source: text, or pre-tokenized (used in place)
TOKEN_DTYPES = ("uint16", "int32", "uint32", "int64")  # of a `format: numpy` token file
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = ("online", "offline", "disabled")
GROWTH_DEPTHS = ("identity", "stack", "gstack")  # gstack: G_stack, copies of the whole trained stack on top
GROWTH_PLACEMENTS = ("top", "bottom", "interleave")
GROWTH_INITS = ("mirror", "zero", "clone")  # clone: HyperCloning-style width (integer multiples)
RESOURCE_KEYS = ("nodes", "gpus_per_node", "cpus_per_task", "time", "partition", "account", "sbatch_args")
# Byte-level BPE starts from 256 byte tokens and needs room for special tokens and merges.
MIN_VOCAB_SIZE = 300

TOP_KEYS = ("run", "tokenizer", "wandb", "defaults", "stages", "vars", "eval", "baseline", "export")
STAGE_KEYS = ("name", "data", "model", "train", "growth", "freeze", "resources", "init")
EXPORT_DTYPES = ("fp32", "bf16")
DEFAULT_KEYS = ("model", "train", "growth", "freeze", "data", "resources")

_SYNTHETIC_RE = re.compile(r"synthetic:level(\d+)")


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


@dataclass
class RunConfig:
    name: str
    seed: int = 1234
    # where sources are tokenized once for every stage and run (see data/cache.py); None:
    # $LLMAGOGY_DATA_CACHE, else data_cache/ beside the run directory
    data_cache: str | None = None


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
    kv_heads: int | None = None  # grouped-query attention's key/value heads (None: = heads)
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
    grad_accum: int = 1  # derived from global_batch when that is set
    global_batch: int | None = None  # sequences per optimizer step (None: micro_batch x grad_accum x dp)
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
    # recompute blocks' activations in backward: "none", "full" (every block) or {every: k}
    # (groups of k blocks keep only their input), as PipelineModule's activation_checkpoint_interval
    activation_checkpointing: Any = "none"

    @property
    def recompute_interval(self) -> int:
        """Blocks per activation-checkpointed group (0: no recomputation); checked in config.checks."""
        ac = self.activation_checkpointing
        if ac == "none":
            return 0
        return 1 if ac == "full" else int(ac["every"])

    @property
    def dp(self) -> int:
        """Data-parallel degree: the processes left after tensor and pipeline parallelism."""
        return self.nproc // (self.tp * self.pp)

    @property
    def global_batch_sequences(self) -> int:
        """Sequences per optimizer step: ``global_batch`` when the stage states it (the same in
        every layout), else micro_batch x grad_accum x dp."""
        if self.global_batch is not None:
            return self.global_batch
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
    # "text" (tokenized into the data cache), or pre-tokenized and used in place: "megatron"
    # (path: the PREFIX of PREFIX.bin + PREFIX.idx) or "numpy" (a flat token file of `dtype`)
    format: str = "text"
    dtype: str | None = None

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
class InitConfig:
    """``init:`` (stage 0 only): start from existing weights instead of a fresh init.

    ``hf``: a local Hugging Face LLaMA directory (config.json, safetensors, tokenizer.json);
    its weights become generation 0 (``interop/import_hf.py``). Absolute after loading."""

    hf: str | None = None


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
    init: InitConfig = field(default_factory=InitConfig)


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
class ExportConfig:
    """``export:`` -- write each stage's final model as a Hugging Face LLaMA to
    ``RUN/stages/NN_name/hf/`` when the stage ends (``interop/export.py``)."""

    hf: bool = True
    dtype: str = "fp32"  # one of EXPORT_DTYPES


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
    export: ExportConfig | None = None  # None: no export at stage ends

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
    kv = (model.heads if model.kv_heads is None else model.kv_heads) * model.head_dim
    per_layer = 2 * h * attn + 2 * h * kv + 3 * h * model.ffn + 2 * h
    return 2 * vocab * h + model.layers * per_layer + h
