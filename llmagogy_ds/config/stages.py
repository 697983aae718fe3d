"""One stage built from its own keys merged over ``defaults``, and the checks that span stages
(growth never shrinks; tensor-parallel pieces divide)."""

from collections.abc import Mapping
from typing import Any

from llmagogy_ds.config.checks import (_check_freeze, _check_growth, _check_init, _check_model, _check_name,
                                        _check_train, tp_split_errors)
from llmagogy_ds.config.coerce import (
    _Block,
    _Checker,
    _check_keys,
    _Ctx,
    _deep_merge,
    _Errors,
    _field_names,
    _mapping,
    _normalize_freeze,
    _section,
)
from llmagogy_ds.config.schema import (
    RESOURCE_KEYS,
    STAGE_KEYS,
    FreezeConfig,
    GrowthConfig,
    InitConfig,
    ModelConfig,
    StageConfig,
    TrainConfig,
)
from llmagogy_ds.config.sources import _build_data, _check_resources


def _stage_label(i: int, stage: Any) -> str:
    name = stage.get("name") if isinstance(stage, Mapping) else None
    return f"stages[{i}] ({name})" if isinstance(name, str) and name else f"stages[{i}]"


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

    growth, freeze, init = GrowthConfig(), FreezeConfig(), InitConfig()
    if "init" in own:  # existing weights (a Hugging Face LLaMA) as generation 0
        if i == 0:
            init, merged["init"] = _merged_block("init", InitConfig, own, {}, label, ctx, _check_init)
        else:
            errs.add(f"{label}.init", "only stage 0 starts from existing weights (later stages grow from it)")
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
            for key in ("heads", "kv_heads", "ffn"):
                errs.check(
                    (getattr(model, key) or 0) % train.tp == 0,
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
        or init is None or not isinstance(name, str) or not data
    ):  # fmt: skip
        return None, merged
    stage = StageConfig(name, data, model, train, growth, freeze, dict(resources), init)
    return stage, merged


_SHRINK_WHAT = {"layers": "layers", "hidden": "width", "heads": "heads", "ffn": "FFN units"}


def _check_tp_pieces(stages: list[tuple[int, StageConfig | None]], errs: _Errors) -> None:
    """Tensor parallelism splits every generation's piece on its own: the heads, kv heads (GQA)
    and FFN units each earlier stage added must divide by a stage's tp (parallel/tensor_parallel.py)."""
    for n, (i, cur) in enumerate(stages):
        if cur is None or cur.train.tp == 1:
            continue
        additions, prev_h, prev_f, prev_kv = [], 0, 0, 0
        for _, st in stages[: n + 1]:
            if st is None:
                break
            kv = st.model.kv_heads or st.model.heads
            additions += [(f"stage {st.name}", st.model.heads - prev_h, "heads"),
                          (f"stage {st.name}", (kv - prev_kv) * (kv != st.model.heads), "kv heads"),
                          (f"stage {st.name}", st.model.ffn - prev_f, "FFN units")]
            prev_h, prev_f, prev_kv = st.model.heads, st.model.ffn, kv
        for msg in tp_split_errors(additions, cur.train.tp):
            errs.add(f"stages[{i}] ({cur.name}).train.tp", msg)


def _check_growth_multiples(prev: StageConfig, cur: StageConfig, label: str, errs: _Errors) -> None:
    """Cloning (``init: clone``) multiplies every width, G_stack (``depth: gstack``) the depth, by
    an integer (model/cloning.py, model/layout.py)."""
    keys = ("hidden", "heads", "ffn") if cur.growth.init == "clone" else ()
    keys += ("layers",) if cur.growth.depth == "gstack" else ()
    for key in keys:
        before, after = getattr(prev.model, key), getattr(cur.model, key)
        if before and after % before:
            how = "init clone needs integer width" if key != "layers" else "depth gstack needs integer depth"
            errs.add(f"{label}.model.{key}", f"{before} -> {after}: growth.{how} multiples")


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
        kv_prev, kv_cur = prev.model.kv_heads or prev.model.heads, cur.model.kv_heads or cur.model.heads
        if kv_prev and kv_cur and prev.model.heads * kv_cur != cur.model.heads * kv_prev:
            errs.add(f"{label}.model.kv_heads", f"heads / kv_heads changes from {prev.model.heads} / {kv_prev} to "
                     f"{cur.model.heads} / {kv_cur}: the group size must stay the same (new query heads form new "
                     "groups with new kv heads, so growth is exact)")
        _check_growth_multiples(prev, cur, label, errs)
        if cur.model.head_dim != prev.model.head_dim:
            errs.add(
                f"{label}.model.head_dim",
                f"changes from {prev.model.head_dim} to {cur.model.head_dim}: head_dim must stay constant "
                "(width growth adds heads of a fixed head_dim)",
            )
