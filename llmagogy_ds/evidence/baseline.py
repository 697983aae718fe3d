"""The from-scratch baseline: the final stage's architecture trained on every stage's corpora
with at least the curriculum's compute, the other half of the FLOPs-to-target ratio.

The baseline is a *derived one-stage curriculum* (``derive_config``): the final stage's model
shape and train block (``baseline.train`` replaces keys), all stages' sources mixed (weights
proportional to the tokens the curriculum trains on each; or ``baseline.data``), and as many
whole optimizer steps as reach ``compute_factor`` × the curriculum's FLOPs (or
``baseline.tokens``). It runs through the ordinary machinery (torchrun/DeepSpeed, checkpoints,
resume, ``llmagogy submit``) in its own run directory, which also holds::

    RUN/curriculum.yaml   the curriculum's config: which held-out sets the baseline is scored on
    RUN/baseline.json     the curriculum's FLOPs and tokens per stage (and where they came from)

Comparability: the baseline uses the curriculum's tokenizer (copied from its run, or trained
from the same config -- BPE training is deterministic, so it is the same file), and at every
eval it also scores each curriculum stage's held-out windows exactly as that stage's trainer
does (same packed data, ``seq_len`` and ``eval_tokens``), logged as ``heldout_loss/<stage>``.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.model.stages import Plan
from llmagogy_ds.data import corpus as D
from llmagogy_ds.config import ConfigError, CurriculumConfig, config_from_dict
from llmagogy_ds.model.flops import flops_per_token

# what may differ between the config given to `baseline` and the curriculum run's frozen one:
# neither changes the data, the model shapes, the held-out sets or the compute
_FREE_TOP_KEYS = ("baseline", "eval", "wandb")


# --------------------------------------------------------------------------- compute
@dataclass
class StageBudget:
    name: str
    steps: int
    tokens: int
    flops: float


def stage_budget(stage, layout, data: D.StageData | None = None,
                 mults: dict[int, float] | None = None) -> StageBudget:
    """Steps, tokens and FLOPs of a stage, counted as train.py counts them (whole optimizer steps
    of the config's global batch; ``epochs`` over the packed training windows; generations with
    multiplier 0 in ``mults`` at 4·N·T). A drift budget's chosen F is known only once it ran."""
    t, seq = stage.train, stage.model.seq_len
    if t.tokens is None and data is None:
        raise ValueError(f"stage {stage.name}: train.epochs needs the stage's packed data to count tokens")
    epoch = 0 if data is None else sum((src["train_tokens"] - 1) // seq * seq for src in data.sources)
    steps = t.steps_for(seq, epoch)
    tokens = steps * t.global_batch_sequences * seq
    return StageBudget(stage.name, steps, tokens, flops_per_token(layout, seq, mults) * tokens)


def budgets_from_config(cfg: CurriculumConfig, run_dir: Path, tok, tok_sha: str) -> list[StageBudget]:
    plan = Plan(cfg, tok.get_vocab_size())
    return [stage_budget(st, plan.layout(s), DP.stage_data(cfg, run_dir, s, tok, tok_sha) if st.train.epochs else None,
                         plan.multipliers(s)) for s, st in enumerate(cfg.stages)]


def budgets_from_run(cfg: CurriculumConfig, run_dir: Path) -> list[StageBudget]:
    """What a finished curriculum run spent, from its stages' result.json."""
    out = []
    for s, st in enumerate(cfg.stages):
        r = RD.stage_result(run_dir, cfg, s)
        if r is None:
            raise RD.RunDirError(f"--curriculum {run_dir}: stage {st.name!r} has not finished (no result.json); "
                                f"finish the curriculum first (llmagogy run ... --run-dir {run_dir}), or leave out "
                                "--curriculum to count its compute from the config")
        out.append(StageBudget(st.name, r["steps"], r["tokens"], r["flops"]))
    return out


# --------------------------------------------------------------------------- the derived config
def _source_key(src) -> dict:
    return {k: v for k, v in asdict(src).items() if k != "weight" and v is not None}


def mixed_sources(cfg: CurriculumConfig, stage_tokens: list[int]) -> list[dict]:
    """Every stage's sources, each weighted by the tokens the curriculum trains on it (a stage's
    tokens split over its sources by weight); a source used by several stages adds up."""
    acc: dict[str, list] = {}
    for st, tokens in zip(cfg.stages, stage_tokens):
        wsum = sum(src.weight for src in st.data)
        for src in st.data:
            item = _source_key(src)
            acc.setdefault(json.dumps(item, sort_keys=True), [item, 0.0])[1] += tokens * src.weight / wsum
    total = sum(w for _, w in acc.values())
    return [{**item, "weight": round(w / total, 6)} for item, w in acc.values()]


def derive_config(cfg: CurriculumConfig, vocab: int, budgets: list[StageBudget]) -> tuple[CurriculumConfig, dict]:
    """The baseline's one-stage config and what it was derived from (``baseline.json``)."""
    final = cfg.stages[-1]
    for i, st in enumerate(cfg.stages[:-1]):
        if st.model.seq_len > final.model.seq_len:
            raise ConfigError(f"stages[{i}] ({st.name}).model.seq_len: {st.model.seq_len} is longer than the final "
                              f"stage's {final.model.seq_len}; the baseline (the final architecture) cannot score "
                              "this stage's held-out windows", cfg.source_path)
    braw = cfg.raw.get("baseline") or {}
    final_raw = cfg.raw["stages"][-1]
    train = {**final_raw["train"], **(braw.get("train") or {})}
    train.pop("epochs", None)
    btrain = cfg.baseline.train if cfg.baseline is not None else final.train
    tokens_per_step = btrain.global_batch_sequences * final.model.seq_len
    fpt = flops_per_token(Plan(cfg, vocab).layout(len(cfg.stages) - 1), final.model.seq_len)
    curriculum_flops = sum(b.flops for b in budgets)
    factor = cfg.baseline.compute_factor if cfg.baseline is not None else 1.0
    if cfg.baseline is not None and cfg.baseline.tokens is not None:
        steps = max(1, -(-cfg.baseline.tokens // tokens_per_step))
        if steps * tokens_per_step * fpt < curriculum_flops:
            need = math.ceil(curriculum_flops / (fpt * tokens_per_step)) * tokens_per_step
            raise ConfigError(f"baseline.tokens: {cfg.baseline.tokens:,} tokens are "
                              f"{steps * tokens_per_step * fpt:.4g} FLOPs, less than the curriculum's {curriculum_flops:.4g}; the baseline needs at least "
                              f"{need:,} tokens (or leave tokens out: compute_factor x the curriculum's FLOPs)",
                              cfg.source_path)
    else:
        steps = max(1, math.ceil(factor * curriculum_flops / (fpt * tokens_per_step)))
    train["tokens"] = steps * tokens_per_step
    if braw.get("data"):
        data = copy.deepcopy(braw["data"])
    else:
        data = mixed_sources(cfg, [b.tokens for b in budgets])
    names = {st.name for st in cfg.stages}
    stage = {"name": "baseline" if "baseline" not in names else "from_scratch", "data": data,
             "model": copy.deepcopy(final_raw["model"]), "train": train}
    if final_raw.get("resources"):
        stage["resources"] = copy.deepcopy(final_raw["resources"])
    raw = {"run": {"name": f"{cfg.run.name}-baseline", "seed": cfg.run.seed},  # same seed: same synthetic corpora
           "tokenizer": copy.deepcopy(cfg.raw["tokenizer"])}
    for key in ("wandb", "eval"):
        if cfg.raw.get(key) is not None:
            raw[key] = copy.deepcopy(cfg.raw[key])
    raw["stages"] = [stage]
    base = Path(cfg.source_path).parent if cfg.source_path else Path.cwd()
    derived = config_from_dict(raw, base, source_path=f"baseline of {cfg.source_path or cfg.run.name}")
    info = {
        "curriculum": cfg.run.name,
        "curriculum_flops": curriculum_flops,
        "stages": [asdict(b) for b in budgets],
        "compute_factor": factor,
        "baseline_steps": steps,
        "baseline_tokens": steps * tokens_per_step,
        "baseline_flops": steps * tokens_per_step * fpt,
        "flops_per_token": fpt,
        "data": data,
    }
    return derived, info


# --------------------------------------------------------------------------- preparing a baseline run dir
def _comparable(raw: dict) -> dict:
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k not in _FREE_TOP_KEYS}
    for st in out.get("stages") or []:
        if isinstance(st, dict):
            st.pop("resources", None)  # where a stage ran, not what it trained
    return out


def check_same_curriculum(cfg: CurriculumConfig, curriculum_run: Path) -> CurriculumConfig:
    """The curriculum run must have been trained from this config (data, shapes, budgets, tokenizer)."""
    ran = RD.load_run_config(curriculum_run)
    a, b = _comparable(ran.raw), _comparable(cfg.raw)
    if a != b:
        diff = "".join(difflib.unified_diff(json.dumps(a, indent=1).splitlines(True),
                                            json.dumps(b, indent=1).splitlines(True), "curriculum run", "this config",
                                            n=1))
        raise RD.RunDirError(f"--curriculum {curriculum_run}: that run was trained from another config than "
                            f"{cfg.source_path}; the baseline must mix the curriculum's own corpora and be scored "
                            f"on its held-out sets. Pass the run's own config ({curriculum_run / 'config.yaml'}).\n{diff}")
    return ran


def _place_tokenizer(cfg: CurriculumConfig, run_dir: Path, curriculum_run: Path | None):
    dst = RD.tokenizer_path(run_dir)
    if curriculum_run is not None:
        src = RD.tokenizer_path(curriculum_run)
        if not src.exists():
            raise RD.RunDirError(f"--curriculum {curriculum_run}: no tokenizer.json")
        if dst.exists() and D.file_sha(dst) != D.file_sha(src):
            raise RD.RunDirError(f"{dst} differs from the curriculum's {src}: the held-out losses would not be "
                                "comparable; use --restart to start the baseline over")
        if not dst.exists():
            RD.write_atomic(dst, src.read_text())
    # without a curriculum run: trained from the curriculum's config (not from the mixed stage,
    # whose text order differs), which gives the curriculum's tokenizer
    return DP.ensure_tokenizer(cfg, run_dir)


def prepare_baseline(cfg: CurriculumConfig, run_dir: Path, curriculum_run: Path | None = None,
                     restart: bool = False) -> tuple[CurriculumConfig, dict]:
    """Open (or resume) the baseline's run dir and prepare everything before any training:
    the curriculum's tokenizer, every curriculum stage's packed data (held-out sets), the
    compute to match, the derived config (frozen as config.yaml) and its mixed corpus."""
    run_dir = Path(run_dir)
    RD.check_run_dir_path(run_dir)  # before curriculum.yaml is written into it
    if curriculum_run is not None:
        curriculum_run = Path(curriculum_run)
        check_same_curriculum(cfg, curriculum_run)
    frozen = run_dir / RD.CURRICULUM
    other = (frozen.exists() and frozen.read_text() != cfg.to_yaml()) or (
        not frozen.exists() and RD.frozen_config_path(run_dir).exists())
    if other and frozen.exists() and not restart and RD.replaceable(run_dir):
        RD.replace_unprepared(run_dir, frozen, cfg.to_yaml())  # its preparation failed: a fixed config may replace it
    elif other:
        if not restart:
            what = "a baseline of another curriculum config" if frozen.exists() else "a run that is not a baseline"
            raise RD.RunDirError(f"{run_dir} holds {what}; use another --run-dir, or --restart to move it aside")
        RD.move_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not frozen.exists():
        RD.mark_unprepared(run_dir)  # until the end of this function
        RD.write_atomic(frozen, cfg.to_yaml())
    tok, sha = _place_tokenizer(cfg, run_dir, curriculum_run)
    DP.prepare_data(cfg, run_dir)  # every curriculum stage's data, and the eval files, checked before training
    if curriculum_run is not None:
        budgets, source = budgets_from_run(cfg, curriculum_run), "result.json of the curriculum run"
    else:
        budgets, source = budgets_from_config(cfg, run_dir, tok, sha), "config"
    derived, info = derive_config(cfg, tok.get_vocab_size(), budgets)
    try:
        RD.open_run_dir(derived, run_dir, until_prepared=True)
    except RD.RunDirError:
        if not restart:
            raise
        RD.move_aside(run_dir)
        return prepare_baseline(cfg, run_dir, curriculum_run)
    DP.prepare_data(derived, run_dir)
    RD.mark_prepared(run_dir)
    info.update(curriculum_run=str(curriculum_run) if curriculum_run else None, curriculum_flops_from=source,
                tokenizer_sha256=sha)
    RD.write_atomic(run_dir / RD.BASELINE_INFO, info)
    return derived, info


def baseline_info(run_dir: Path) -> dict | None:
    return RD.read_json(Path(run_dir) / RD.BASELINE_INFO)


__all__ = ["StageBudget", "stage_budget", "budgets_from_config", "budgets_from_run", "mixed_sources", "derive_config",
           "prepare_baseline", "check_same_curriculum", "baseline_info"]
