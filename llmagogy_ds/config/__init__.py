"""Typed curriculum configuration: YAML -> validated dataclasses, before any compute runs.

A run is an ordered list of *stages*; each stage has its own corpus, model shape and
training hyper-parameters.  ``defaults`` is deep-merged under every stage (stage wins).

Everything that can be checked without touching a GPU is checked here, and *all* problems
are reported at once in a single :class:`ConfigError`, one per line, each naming the key
path (e.g. ``stages[1] (primary).model.hidden``) -- a typo in stage 12 should not surface
after eleven stages of training.
"""

from llmagogy_ds.config.checks import parallel_limits, tp_split_errors
from llmagogy_ds.config.load import config_from_dict, load_config
from llmagogy_ds.config.overrides import apply_overrides
from llmagogy_ds.config.schema import (
    DATA_EXTENSIONS,
    BaselineConfig,
    ConfigError,
    CurriculumConfig,
    DataSource,
    EvalConfig,
    ExportConfig,
    FreezeConfig,
    GrowthConfig,
    InitConfig,
    ModelConfig,
    RunConfig,
    StageConfig,
    TokenizerConfig,
    TrainConfig,
    WandbConfig,
    approx_params,
)

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
    "ExportConfig",
    "InitConfig",
    "BaselineConfig",
    "CurriculumConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "approx_params",
    "parallel_limits",
    "tp_split_errors",
    "DATA_EXTENSIONS",
]
