"""Tests for llmagogy_ds.config: loading, overrides, and every validation error path."""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmagogy_ds.config import (
    ConfigError,
    CurriculumConfig,
    DataSource,
    ModelConfig,
    apply_overrides,
    approx_params,
    config_from_dict,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BASE: dict[str, Any] = {
    "run": {"name": "t", "seed": 1},
    "tokenizer": {"vocab_size": 512},
    "defaults": {
        "model": {"head_dim": 16, "seq_len": 32},
        "train": {"micro_batch": 2, "nproc": 2, "lr": 3.0e-3},
    },
    "stages": [
        {
            "name": "nursery",
            "data": [{"path": "synthetic:level0"}],
            "model": {"layers": 2, "hidden": 64, "heads": 4, "ffn": 176},
            "train": {"tokens": 10000},
        },
        {
            "name": "primary",
            "data": [{"path": "synthetic:level1", "weight": 1.0}],
            "model": {"layers": 4, "hidden": 96, "heads": 6, "ffn": 256},
            "train": {"tokens": 20000},
            "growth": {"depth": "identity", "placement": "interleave"},
            "freeze": 0.5,
        },
    ],
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def build(raw: dict[str, Any], tmp_path: Path, check_files: bool = True) -> CurriculumConfig:
    return config_from_dict(raw, tmp_path, check_files=check_files)


def errors_of(raw: dict[str, Any], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        build(raw, tmp_path)
    return str(info.value)


# ----------------------------------------------------------------------------- shipped configs


def test_tiny_yaml_loads() -> None:
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.run.name == "tiny"
    assert [s.name for s in cfg.stages] == ["nursery", "primary", "middle"]
    assert cfg.tokenizer.vocab_size == 512
    primary = cfg.stage("primary")
    assert primary.model.hidden == 96 and primary.train.nproc == 2 and primary.train.lr == pytest.approx(3e-3)
    assert primary.freeze.value == 0.5 and primary.growth.depth == "identity"
    assert [(d.path, d.weight) for d in primary.data] == [("synthetic:level1", 1.0), ("synthetic:level0", 0.2)]
    assert all(d.is_synthetic for s in cfg.stages for d in s.data)
    assert cfg.stage_index("middle") == 2


def test_example_1b_loads_without_files() -> None:
    cfg = load_config(CONFIGS / "example-1b.yaml", check_files=False)
    assert len(cfg.stages) >= 15
    assert cfg.tokenizer.vocab_size is not None
    first = approx_params(cfg.stages[0].model, cfg.tokenizer.vocab_size)
    prefinal = approx_params(cfg.stages[-2].model, cfg.tokenizer.vocab_size)
    final = approx_params(cfg.stages[-1].model, cfg.tokenizer.vocab_size)
    assert 5e6 <= first <= 3e7
    assert 0.9e9 <= prefinal <= 1.2e9 and 6.5e9 <= final <= 7.2e9
    assert cfg.stages[-1].train.precision == "bf16"
    assert cfg.stages[0].train.nproc == 8 and cfg.stages[-2].train.nproc == 64
    last = cfg.stages[-1].train
    assert (last.tp, last.pp, last.nproc, last.dp) == (2, 2, 32, 8) and cfg.stages[-1].freeze.value == 0
    assert any(s.resources for s in cfg.stages)
    assert any(d.is_hub for d in cfg.stages[-1].data)


def test_approx_params_formula() -> None:
    m = ModelConfig(layers=2, hidden=64, heads=4, ffn=176, head_dim=16)
    per_layer = 4 * 64 * 64 + 3 * 64 * 176 + 2 * 64
    assert approx_params(m, 512) == 2 * 512 * 64 + 2 * per_layer + 64


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", overrides=["stages.primary.train.lr=1e-3"])
    frozen = tmp_path / "config.yaml"
    frozen.write_text(cfg.to_yaml())
    again = load_config(frozen)
    assert again.stages == cfg.stages and again.run == cfg.run and again.tokenizer == cfg.tokenizer
    assert "defaults" not in yaml.safe_load(cfg.to_yaml())  # self-contained: defaults folded in


# ----------------------------------------------------------------------------- merging / overrides


def test_defaults_merge_and_stage_wins(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["train"]["nproc"] = 1
    cfg = build(raw, tmp_path)
    assert cfg.stages[0].train.nproc == 2 and cfg.stages[1].train.nproc == 1
    assert cfg.stages[1].model.seq_len == 32 and cfg.stages[1].train.global_batch_sequences == 2


def test_override_one_stage_float(tmp_path: Path) -> None:
    raw = apply_overrides(base(), ["stages.primary.train.lr=1e-3"])
    cfg = build(raw, tmp_path)
    lr = cfg.stage("primary").train.lr
    assert isinstance(lr, float) and lr == 0.001
    assert cfg.stage("nursery").train.lr == pytest.approx(3e-3)


def test_override_by_index_and_new_keys(tmp_path: Path) -> None:
    raw = apply_overrides(base(), ["stages.0.train.warmup_steps=7", "wandb.mode=disabled"])
    cfg = build(raw, tmp_path)
    assert cfg.stages[0].train.warmup_steps == 7 and cfg.wandb.mode == "disabled"


def test_override_defaults_reach_all_stages(tmp_path: Path) -> None:
    cfg = build(apply_overrides(base(), ["defaults.train.nproc=1"]), tmp_path)
    assert [s.train.nproc for s in cfg.stages] == [1, 1]


def test_override_does_not_mutate_input() -> None:
    raw = base()
    apply_overrides(raw, ["defaults.train.nproc=1"])
    assert raw == BASE


def test_load_config_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_config(path, overrides=["stages.primary.freeze.auto=true", "stages.primary.freeze.drift_budget=0.2"])
    assert cfg.stage("primary").freeze.value == 0.5 and cfg.stage("primary").freeze.auto
    assert cfg.source_path == str(path.resolve())


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stages.nope.train.lr=1", "no stage named 'nope'"),
        ("stages.9.train.lr=1", "no stage named '9'"),
        ("train.lr", "key.path=value"),
        ("stages.primary=1", "inside the stage"),
    ],
)
def test_bad_override(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(base(), [override])
    assert f"override {override!r}" in str(info.value) and expected in str(info.value)


# ----------------------------------------------------------------------------- freeze forms


def test_freeze_scalar_and_mapping(tmp_path: Path) -> None:
    raw = base()
    assert build(raw, tmp_path).stages[1].freeze.value == 0.5
    raw["stages"][1]["freeze"] = {"value": 0.25, "auto": True, "drift_budget": 0.2}
    fz = build(raw, tmp_path).stages[1].freeze
    assert (fz.value, fz.auto, fz.drift_budget) == (0.25, True, 0.2)


def test_freeze_default_scalar_merges_with_stage_mapping(tmp_path: Path) -> None:
    raw = base()
    raw["defaults"]["freeze"] = 0.3
    raw["stages"][1]["freeze"] = {"auto": True, "drift_budget": 0.1}
    fz = build(raw, tmp_path).stages[1].freeze
    assert (fz.value, fz.auto) == (0.3, True)
    assert build(raw, tmp_path).stages[0].freeze.value == 1.0  # defaults do not apply to stage 0


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_freeze_out_of_range(tmp_path: Path, value: float) -> None:
    raw = base()
    raw["stages"][1]["freeze"] = value
    assert "stages[1] (primary).freeze.value: F must be in [0, 1]" in errors_of(raw, tmp_path)


def test_freeze_auto_requires_budget(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["freeze"] = {"value": 0.5, "auto": True}
    assert "stages[1] (primary).freeze.drift_budget" in errors_of(raw, tmp_path)


# ----------------------------------------------------------------------------- validation errors


def test_unknown_key_suggests(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["model"]["lyers"] = 3
    msg = errors_of(raw, tmp_path)
    assert "stages[1] (primary).model.lyers: unknown key 'lyers' (did you mean 'layers'?)" in msg


def test_unknown_key_in_defaults_and_top(tmp_path: Path) -> None:
    raw = base()
    raw["defaults"]["train"]["warmup"] = 3
    raw["stagse"] = []
    msg = errors_of(raw, tmp_path)
    assert "defaults.train.warmup: unknown key 'warmup' (did you mean 'warmup_steps'?)" in msg
    assert "stagse: unknown key 'stagse' (did you mean 'stages'?)" in msg


@pytest.mark.parametrize("key, value", [("layers", 1), ("hidden", 48), ("heads", 3), ("ffn", 100)])
def test_shrinking_is_an_error(tmp_path: Path, key: str, value: int) -> None:
    raw = base()
    model = raw["stages"][1]["model"]
    model[key] = value
    if key == "hidden":
        model["heads"] = 3  # keep hidden == heads x head_dim so only shrinking is reported
    if key == "heads":
        model["hidden"] = 48
    msg = errors_of(raw, tmp_path)
    before = BASE["stages"][0]["model"][key]
    assert f"stages[1] (primary).model.{key}: shrinks from {before} to {value}: growth cannot remove" in msg


def test_head_dim_must_stay_constant(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["model"].update(head_dim=32, heads=3)
    assert "stages[1] (primary).model.head_dim: changes from 16 to 32" in errors_of(raw, tmp_path)


def test_hidden_must_equal_heads_times_head_dim(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["model"]["hidden"] = 100
    msg = errors_of(raw, tmp_path)
    assert "stages[1] (primary).model.hidden: must equal heads x head_dim = 6 x 16 = 96, got 100" in msg


def test_missing_data(tmp_path: Path) -> None:
    raw = base()
    del raw["stages"][1]["data"]
    assert "stages[1] (primary).data: missing or empty data" in errors_of(raw, tmp_path)


def test_empty_data_list(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][0]["data"] = []
    assert "stages[0] (nursery).data: missing or empty data" in errors_of(raw, tmp_path)


def test_defaults_data_is_inherited(tmp_path: Path) -> None:
    raw = base()
    raw["defaults"]["data"] = [{"path": "synthetic:level0"}]
    del raw["stages"][1]["data"]
    assert build(raw, tmp_path).stages[1].data[0].path == "synthetic:level0"


def test_empty_data_file(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    raw = base()
    raw["stages"][0]["data"] = [{"path": "empty.txt"}]
    msg = errors_of(raw, tmp_path)
    assert "stages[0] (nursery).data[0].path: data file is empty" in msg


def test_missing_file(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["data"].append({"path": "./corpus/missing.jsonl", "weight": 0.5})
    msg = errors_of(raw, tmp_path)
    assert "stages[1] (primary).data[1].path: no such file or directory" in msg
    assert str(tmp_path / "corpus" / "missing.jsonl") in msg
    build(raw, tmp_path, check_files=False)  # file checks off: fine


def test_local_files_resolved_relative_to_config(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "held.txt").write_text("held out\n")
    path = tmp_path / "c.yaml"
    raw = base()
    raw["stages"][0]["data"] = [{"path": "corpus", "heldout": "held.txt"}, "synthetic:level0"]
    path.write_text(yaml.safe_dump(raw))
    src = load_config(path).stages[0].data[0]
    assert src.path == str(corpus) and src.heldout == str(tmp_path / "held.txt") and src.is_local


def test_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    raw = base()
    raw["stages"][0]["data"] = [{"path": "./d"}]
    assert "stages[0] (nursery).data[0].path: directory has no" in errors_of(raw, tmp_path)


def test_hub_name_is_accepted(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["data"] = [{"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"}]
    src = build(raw, tmp_path).stages[1].data[0]
    assert src.is_hub and not src.is_local and src.path == "HuggingFaceFW/fineweb-edu"
    assert DataSource("synthetic:level3").synthetic_level == 3


def test_bad_weight_and_synthetic_form(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["data"] = [{"path": "synthetic:lvl1", "weight": 0}]
    msg = errors_of(raw, tmp_path)
    assert "stages[1] (primary).data[0].weight: must be > 0" in msg
    assert "stages[1] (primary).data[0].path: expected 'synthetic:levelN'" in msg


def test_duplicate_stage_names(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["name"] = "nursery"
    assert "stages[1] (nursery).name: duplicate stage name" in errors_of(raw, tmp_path)


def test_bad_stage_name(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["name"] = "grade 1"
    assert "stages[1] (grade 1).name: 'grade 1' must match" in errors_of(raw, tmp_path)


def test_tokens_and_epochs_both_set(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["train"]["epochs"] = 1.0
    assert "stages[1] (primary).train: set exactly one of tokens or epochs (both" in errors_of(raw, tmp_path)


def test_tokens_and_epochs_neither_set(tmp_path: Path) -> None:
    raw = base()
    del raw["stages"][0]["train"]["tokens"]
    assert "stages[0] (nursery).train: set exactly one of tokens or epochs (neither" in errors_of(raw, tmp_path)


def test_null_drops_inherited_budget(tmp_path: Path) -> None:
    raw = base()
    raw["defaults"]["train"]["tokens"] = 50000
    raw["stages"][1]["train"] = {"tokens": None, "epochs": 2}
    cfg = build(raw, tmp_path)
    assert cfg.stages[0].train.tokens == 10000 and cfg.stages[1].train.epochs == 2.0


@pytest.mark.parametrize("key", ["growth", "freeze"])
def test_growth_or_freeze_on_stage_zero(tmp_path: Path, key: str) -> None:
    raw = base()
    raw["stages"][0][key] = {"depth": "stack"} if key == "growth" else 0.5
    msg = errors_of(raw, tmp_path)
    assert f"stages[0] (nursery).{key}: stage 0 has nothing to" in msg


def test_train_enums_and_parallelism(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["train"].update(schedule="cosin", precision="fp8", zero_stage=2, pp=2, nproc=3)
    msg = errors_of(raw, tmp_path)
    for expected in (
        "stages[1] (primary).train.schedule: must be one of cosine, linear, constant",
        "stages[1] (primary).train.precision: must be one of fp32, bf16, fp16",
        "stages[1] (primary).train.nproc: must be divisible by tp x pp = 2, got 3",
        "stages[1] (primary).train.zero_stage: pipeline parallel (pp=2) requires zero_stage <= 1",
    ):
        assert expected in msg


def test_dp_and_global_batch() -> None:
    from llmagogy_ds.config import TrainConfig

    t = TrainConfig(micro_batch=4, grad_accum=2, nproc=8, tp=2, pp=1)
    assert t.dp == 4 and t.global_batch_sequences == 32


def test_inherited_bad_value_reported_once_at_defaults(tmp_path: Path) -> None:
    raw = base()
    raw["defaults"]["train"]["lr"] = -1
    err = pytest.raises(ConfigError, build, raw, tmp_path).value
    assert err.errors.count("defaults.train.lr: must be > 0") == 1


def test_type_errors_and_numeric_strings(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["train"]["lr"] = "1e-3"  # PyYAML leaves this a string; accept it
    raw["stages"][1]["train"]["tokens"] = "4e4"
    cfg = build(raw, tmp_path)
    assert cfg.stages[1].train.lr == 0.001 and cfg.stages[1].train.tokens == 40000
    raw["stages"][1]["model"]["layers"] = "four"
    assert "stages[1] (primary).model.layers: expected an integer, got 'four'" in errors_of(raw, tmp_path)


def test_tokenizer_rules(tmp_path: Path) -> None:
    raw = base()
    raw["tokenizer"] = {"vocab_size": 200}
    assert "tokenizer.vocab_size: must be >= 300" in errors_of(raw, tmp_path)
    raw["tokenizer"] = {"vocab_size": 512, "path": "tok.json"}
    assert "tokenizer: set exactly one of vocab_size" in errors_of(raw, tmp_path)
    raw["tokenizer"] = {"path": "tok.json"}
    assert "tokenizer.path: tokenizer file not found" in errors_of(raw, tmp_path)
    (tmp_path / "tok.json").write_text("{}")
    assert build(raw, tmp_path).tokenizer.path == str(tmp_path / "tok.json")


def test_resources(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["resources"] = {"nodes": 2, "gpus_per_node": 8, "time": "24:00:00"}
    assert build(raw, tmp_path).stages[1].resources["nodes"] == 2
    raw["stages"][1]["resources"] = {"node": 2, "time": 86400}
    msg = errors_of(raw, tmp_path)
    assert "stages[1] (primary).resources.node: unknown key 'node' (did you mean 'nodes'?)" in msg
    assert "stages[1] (primary).resources.time: must be a quoted string" in msg


def test_all_errors_collected_one_per_line(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["model"]["hidden"] = 100
    raw["stages"][1]["freeze"] = 2.0
    raw["wandb"] = {"mode": "sometimes"}
    err = pytest.raises(ConfigError, build, raw, tmp_path).value
    assert len(err.errors) == 3
    assert all(line in str(err).splitlines()[1:] for line in (f"  {e}" for e in err.errors))
    assert isinstance(err, ValueError)


def test_no_stages(tmp_path: Path) -> None:
    raw = base()
    raw["stages"] = []
    assert "stages: at least one stage is required" in errors_of(raw, tmp_path)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: x\nstages: [")
    with pytest.raises(ConfigError, match="bad.yaml: YAML syntax error"):
        load_config(bad)


# ------------------------------------------------ train.global_batch: the stage's, not the layout's
def _with_global_batch(tmp_path: Path, gb: int, **train: Any) -> CurriculumConfig:
    raw = base()
    raw["stages"][1]["train"].update({"global_batch": gb, **train})
    return build(raw, tmp_path)


def test_global_batch_derives_grad_accum_at_any_layout(tmp_path: Path) -> None:
    # micro_batch 2, nproc 2 (defaults); primary has 6 heads, 256 FFN units (tp=2 divides them)
    for layout, accum in (({}, 4), ({"tp": 2}, 8), ({"pp": 2, "zero_stage": 1}, 8)):
        t = _with_global_batch(tmp_path, 16, **layout).stages[1].train
        assert (t.grad_accum, t.global_batch_sequences, t.dp) == (accum, 16, 16 // (2 * accum))
    cfg = build(base(), tmp_path)  # not set: micro_batch x grad_accum x dp, as before
    assert [(s.train.grad_accum, s.train.global_batch_sequences) for s in cfg.stages] == [(1, 4), (1, 4)]


def test_global_batch_that_does_not_divide_is_an_error(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["train"].update({"global_batch": 6, "micro_batch": 4})
    msg = errors_of(raw, tmp_path)
    assert "stages[1] (primary).train.global_batch: 6 sequences is not divisible by micro_batch x dp = 4 x 2 = 8" in msg


def test_global_batch_and_disagreeing_grad_accum_is_an_error(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][1]["train"].update({"global_batch": 16, "grad_accum": 2})
    msg = errors_of(raw, tmp_path)
    assert "stages[1] (primary).train.grad_accum: 2 disagrees with global_batch 16" in msg
    t = _with_global_batch(tmp_path, 16, grad_accum=4).stages[1].train  # agreeing: fine
    assert t.grad_accum == 4 and t.global_batch_sequences == 16


def test_tiny_last_stage_global_batch_is_the_same_at_tp_and_pp() -> None:
    for sets, accum in (([], 1), (["stages.middle.train.tp=2"], 2),
                        (["stages.middle.train.pp=2", "stages.middle.train.zero_stage=1"], 2)):
        cfg = load_config(CONFIGS / "tiny.yaml", sets)
        t = cfg.stages[2].train
        assert (t.grad_accum, t.global_batch_sequences) == (accum, 32)
        assert t.steps_for(cfg.stages[2].model.seq_len, 1) == 220  # 900000 tokens / 4096 per step
    assert [s.train.global_batch_sequences for s in load_config(CONFIGS / "tiny.yaml").stages] == [32, 32, 32]


def test_elastic_split_keeps_the_stated_global_batch() -> None:
    from llmagogy_ds.config import TrainConfig
    from llmagogy_ds.train.step import elastic_split

    t = TrainConfig(micro_batch=4, grad_accum=2, global_batch=32, nproc=8, tp=2)  # dp 4: 4 x 2 x 4
    assert elastic_split(t, 4) is t
    for world, micro, accum in ((1, 4, 8), (2, 4, 4), (8, 4, 1), (16, 2, 1)):
        s = elastic_split(t, world)
        assert (s.micro_batch, s.grad_accum, s.global_batch_sequences) == (micro, accum, 32)
        assert s.micro_batch * s.grad_accum * world == 32
    # not derived yet (built directly): still split to the stated global batch
    s = elastic_split(TrainConfig(micro_batch=4, global_batch=32, nproc=2), 2)
    assert (s.micro_batch, s.grad_accum) == (4, 4)
    with pytest.raises(ValueError, match="global batch 32 sequences"):
        elastic_split(t, 5)
