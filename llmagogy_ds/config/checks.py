"""Value checks of the one-block sections (run, tokenizer, wandb, model, train, growth, freeze),
and the parallelism limits the trainer shares."""

import re

from llmagogy_ds.config.coerce import _Block, _Ctx, _Errors, _one_of, _resolve
from llmagogy_ds.config.schema import (
    EXPORT_DTYPES,
    GROWTH_DEPTHS,
    GROWTH_INITS,
    GROWTH_PLACEMENTS,
    MIN_VOCAB_SIZE,
    PRECISIONS,
    SCHEDULES,
    WANDB_MODES,
    ZERO_STAGES,
    ExportConfig,
    FreezeConfig,
    GrowthConfig,
    InitConfig,
    ModelConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
    WandbConfig,
)

# Names become directory, checkpoint and SLURM job names and command-line values (--stage NAME):
# the first character may not be "." (".", ".." escape the directory) or "-" (read as an option).
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_NAME_LEN = 100  # with the NN_ prefix and suffixes, well under a file name's 255 bytes


def _check_name(name: str, where: str, errs: _Errors) -> None:
    if not _NAME_RE.fullmatch(name):
        errs.add(where, f"{name!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]* (a letter, digit or '_' first: "
                        "it names a directory and is passed on command lines)")
    else:
        errs.check(len(name) <= MAX_NAME_LEN, where, f"too long ({len(name)} characters, at most {MAX_NAME_LEN})")


def _check_run(run: RunConfig, blk: _Block, ctx: _Ctx) -> None:
    _check_name(run.name, blk.where("name"), ctx.errs)
    ctx.errs.check(run.seed >= 0, blk.where("seed"), "must be >= 0")
    if run.data_cache is not None:
        if not isinstance(run.data_cache, str) or not run.data_cache.strip():
            ctx.errs.add(blk.where("data_cache"), f"expected a directory path, got {run.data_cache!r}")
        else:  # relative to the config file, like every path of the config
            run.data_cache = blk.data["data_cache"] = str(_resolve(run.data_cache, ctx.base_dir))


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
    if m.kv_heads is not None and m.heads >= 1:
        errs.check(1 <= m.kv_heads <= m.heads and m.heads % m.kv_heads == 0, blk.where("kv_heads"),
                   f"must divide heads={m.heads} (each kv head serves a whole group of query heads), "
                   f"got {m.kv_heads}")


def parallel_limits(tp: int, pp: int, zero_stage: int) -> list[str]:
    """The reasons a tensor/pipeline-parallel and ZeRO combination cannot run (empty: it can)."""
    reasons = []
    # DeepSpeed's pipeline engine refuses ZeRO-2/3 (gradient partitioning conflicts with PP).
    if pp > 1 and zero_stage > 1:
        reasons.append(f"pipeline parallel (pp={pp}) requires zero_stage <= 1, got {zero_stage}")
    # ZeRO-3 partitions the parameters the tensor-parallel layers slice themselves
    if tp > 1 and zero_stage > 2:
        reasons.append(f"tensor parallel (tp={tp}) requires zero_stage <= 2, got {zero_stage}")
    return reasons


def tp_split_errors(additions, tp: int) -> list[str]:
    """Tensor parallelism splits every generation's piece on its own, so what each generation
    adds must divide by tp. ``additions``: ``(who, count, what)``, e.g. ``("stage b", 6, "heads")``."""
    return [f"{who} adds {n} {what}, not divisible by tp={tp} "
            "(each generation's piece is split across the TP ranks on its own)"
            for who, n, what in additions if n > 0 and n % tp]


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
    for reason in parallel_limits(t.tp, t.pp, t.zero_stage):
        errs.add(blk.at("zero_stage"), reason)
    _check_activation_checkpointing(t, blk, ctx)
    _derive_grad_accum(t, blk, ctx)


def _check_activation_checkpointing(t: TrainConfig, blk: _Block, ctx: _Ctx) -> None:
    ac, where = t.activation_checkpointing, blk.where("activation_checkpointing")
    if ac in ("none", "full"):
        return
    every = ac.get("every") if isinstance(ac, dict) and set(ac) == {"every"} else None
    if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return
    ctx.errs.add(where, f"must be none, full or {{every: k}} with k >= 1 blocks per recomputed group, got {ac!r}")


def _derive_grad_accum(t: TrainConfig, blk: _Block, ctx: _Ctx) -> None:
    """``global_batch`` (sequences per optimizer step) belongs to the stage, not to its layout:
    grad_accum = global_batch / (micro_batch x dp), the same global batch at any tp and pp."""
    if t.global_batch is None:
        return
    errs, w = ctx.errs, blk.where
    if t.global_batch < 1:
        errs.add(w("global_batch"), f"must be a positive integer, got {t.global_batch}")
        return
    if min(t.micro_batch, t.nproc, t.tp, t.pp) < 1 or t.nproc % (t.tp * t.pp):
        return  # reported above
    per_step = t.micro_batch * t.dp
    if t.global_batch % per_step:
        errs.add(w("global_batch"), f"{t.global_batch} sequences is not divisible by micro_batch x dp = "
                                    f"{t.micro_batch} x {t.dp} = {per_step} (dp = nproc {t.nproc} / (tp {t.tp} "
                                    f"x pp {t.pp})): grad_accum is derived from it")
        return
    derived = t.global_batch // per_step
    if "grad_accum" in blk.data and t.grad_accum != derived:
        errs.add(w("grad_accum"), f"{t.grad_accum} disagrees with global_batch {t.global_batch} / (micro_batch x dp "
                                  f"= {per_step}) = {derived}; set global_batch or grad_accum, not both")
        return
    t.grad_accum = derived


def _check_growth(g: GrowthConfig, blk: _Block, ctx: _Ctx) -> None:
    _one_of(g.depth, GROWTH_DEPTHS, blk.where("depth"), ctx.errs)
    _one_of(g.placement, GROWTH_PLACEMENTS, blk.where("placement"), ctx.errs)
    _one_of(g.init, GROWTH_INITS, blk.where("init"), ctx.errs)
    _one_of(g.optimizer, ("carry", "reset"), blk.where("optimizer"), ctx.errs)


def _check_init(i: InitConfig, blk: _Block, ctx: _Ctx) -> None:
    # A local Hugging Face model directory; what it holds is checked by interop.import_hf
    # before any compute (this room cannot read model files).
    if i.hf is not None:
        resolved = _resolve(i.hf, ctx.base_dir)
        if ctx.check_files and not (resolved / "config.json").is_file():
            ctx.errs.add(blk.where("hf"), f"not a Hugging Face model directory (no config.json): {resolved}")
        i.hf = blk.data["hf"] = str(resolved)


def _check_export(e: ExportConfig, blk: _Block, ctx: _Ctx) -> None:
    _one_of(e.dtype, EXPORT_DTYPES, blk.where("dtype"), ctx.errs)


def _check_freeze(f: FreezeConfig, blk: _Block, ctx: _Ctx) -> None:
    ctx.errs.check(0.0 <= f.value <= 1.0, blk.where("value"), f"F must be in [0, 1], got {f.value}")
    if f.drift_budget is not None:
        ctx.errs.check(f.drift_budget > 0, blk.where("drift_budget"), "must be > 0")
    if f.auto and f.drift_budget is None:
        ctx.errs.add(blk.at("drift_budget"), "auto: true requires a drift_budget > 0")
