"""A stage's starting point, prepared by rank 0 before the ranks start: fresh weights (stage 0,
``init/``) or, for a grown stage, ``growth.json``'s record of how it grows (the ranks then grow
it, each its own part: ``train.grow``); and the F each generation trains with."""
from __future__ import annotations

from pathlib import Path

import torch

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.prepare import ensure_tokenizer, stage_data
from llmagogy_ds.interop.import_hf import ensure_run_tokenizer, stage0_weights
from llmagogy_ds.model.flops import forward_flops_per_token
from llmagogy_ds.model.growth import preserves_function
from llmagogy_ds.model.gpt import fresh_init
from llmagogy_ds.model.stages import NORM_EPS_KEY, ONE_EPS, PER_NORM_EPS, Plan
from llmagogy_ds.train.branch import ensure_branch


def effective_multipliers(plan: Plan, run_dir: Path, s: int) -> dict[int, float]:
    """lr multipliers at stage ``s``: products of F, where a drift-budget stage (freeze.auto)
    contributes the F it chose for each generation (its result.json) instead of the config's."""
    chosen = {}
    for t in range(1, s + 1):
        r = RD.stage_result(run_dir, plan.cfg, t) if plan.cfg.stages[t].freeze.auto else None
        for e in (r or {}).get("generations", []):
            if "chosen_F" in e:
                chosen[(t, e["generation"])] = e["chosen_F"]
    return plan.multipliers(s, chosen)


def growth_record(plan: Plan, s: int, windows) -> dict:
    """How stage ``s`` grows (``growth.json``, before any measurement is added to it)."""
    stage = plan.cfg.stages[s]
    return {
        "depth": stage.growth.depth, "placement": stage.growth.placement, "init": stage.growth.init,
        "function_preserving": preserves_function(stage.growth.depth, stage.growth.init),
        # the check's forward passes on the held-out windows (exams not counted), apart from training
        "check_flops": len(windows) * stage.model.seq_len * (
            forward_flops_per_token(plan.layout(s - 1), stage.model.seq_len)
            + forward_flops_per_token(plan.layout(s), stage.model.seq_len)),
        "optimizer": stage.growth.optimizer, NORM_EPS_KEY: PER_NORM_EPS if plan.per_norm_eps else ONE_EPS,
    }


def prev_weights(cfg: CurriculumConfig, run_dir: Path, s: int) -> Path:
    """The final weights of the stage before ``s`` (shards, or an older run's ``model.pt``)."""
    prev_dir = RD.stage_dir(run_dir, cfg, s - 1)
    found = RD.weights_at(prev_dir, RD.MODEL_DIR)
    if found is None:
        raise RD.RunDirError(f"stage {cfg.stages[s].name!r} grows from {cfg.stages[s - 1].name!r}, which has not "
                             f"finished ({prev_dir / RD.MODEL_DIR} missing): run the earlier stage first")
    return found


def prepare_stage(cfg: CurriculumConfig, run_dir: Path, s: int) -> None:
    """Rank 0, before the ranks build the stage: tokenizer and data; stage 0's weights (``init/``);
    for a grown stage only what is cheap: the previous weights are there, and ``growth.json``
    says how it grows. The ranks grow the weights themselves, each its own part, and measure
    the function-preservation check together (``train.grow``). Idempotent. An expert branch
    first gets the trunk's stages and tokenizer and checks its lineage (``train.branch``)."""
    ensure_branch(run_dir, s)
    sdir = RD.stage_dir(run_dir, cfg, s)
    sdir.mkdir(parents=True, exist_ok=True)
    if RD.weights_at(sdir, RD.INIT_DIR) is not None or (s > 0 and (sdir / RD.GROWTH).exists()):
        return
    ensure_run_tokenizer(cfg, run_dir)  # stages[0].init.hf: that model's tokenizer is the run's
    tok, sha = ensure_tokenizer(cfg, run_dir)
    plan = RD.run_plan(run_dir, cfg, tok.get_vocab_size())  # with the run's RMSNorm epsilon rule
    stage = cfg.stages[s]
    seed = cfg.run.seed * 1000 + s
    if s == 0:  # a Hugging Face LLaMA as generation 0, or fresh weights: small enough for one process
        weights = (stage0_weights(cfg, plan.layout(0)) if stage.init.hf else
                   fresh_init(plan.layout(0), stage.model.init_std, torch.Generator().manual_seed(seed)))
        RD.write_store(sdir / RD.INIT_DIR, weights)
        return
    prev_weights(cfg, run_dir, s)
    data = stage_data(cfg, run_dir, s, tok, sha)
    windows = D.heldout_windows(data, stage.model.seq_len, stage.train.eval_tokens)
    RD.write_atomic(sdir / RD.GROWTH, growth_record(plan, s, windows))


__all__ = ["effective_multipliers", "growth_record", "prev_weights", "prepare_stage"]
