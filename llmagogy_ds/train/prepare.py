"""A stage's starting point: fresh weights (stage 0) or the previous stage's weights grown into
this stage's layout, with the function-preservation check and Adam moments carried across
growth (``init.pt``, ``growth.json``, ``init_moments.pt``); and the F each generation trains with."""
from __future__ import annotations

from pathlib import Path

import torch

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.prepare import ensure_tokenizer, read_exams, stage_data
from llmagogy_ds.evaluation.evaluate import exam_accuracy, heldout_loss
from llmagogy_ds.interop.import_hf import ensure_run_tokenizer, stage0_weights
from llmagogy_ds.model.growth import grow_moments, grow_state_dict
from llmagogy_ds.model.gpt import fresh_init
from llmagogy_ds.model.stages import NORM_EPS_KEY, ONE_EPS, PER_NORM_EPS, Plan


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


def evaluate_weights(plan: Plan, s_layout: int, weights: dict, windows, exams: list[dict], tokenizer,
                     seq_len: int) -> dict:
    model = plan.model(s_layout)
    model.load_state_dict(weights)
    out = {"heldout_loss": heldout_loss(model, windows)}
    if exams:
        out["exam"] = exam_accuracy(model, tokenizer, exams, seq_len)
    return out


def prepare_stage(cfg: CurriculumConfig, run_dir: Path, s: int) -> Path:
    """Write ``init.pt`` (and ``growth.json``) for stage ``s`` if not there yet; idempotent."""
    sdir = RD.stage_dir(run_dir, cfg, s)
    sdir.mkdir(parents=True, exist_ok=True)
    init = sdir / RD.INIT
    if init.exists():
        return init
    ensure_run_tokenizer(cfg, run_dir)  # stages[0].init.hf: that model's tokenizer is the run's
    tok, sha = ensure_tokenizer(cfg, run_dir)
    plan = RD.run_plan(run_dir, cfg, tok.get_vocab_size())  # with the run's RMSNorm epsilon rule
    stage = cfg.stages[s]
    seed = cfg.run.seed * 1000 + s
    if s == 0 and stage.init.hf:  # a Hugging Face LLaMA as generation 0
        weights = stage0_weights(cfg, plan.layout(0))
    elif s == 0:
        weights = fresh_init(plan.layout(0), stage.model.init_std, torch.Generator().manual_seed(seed))
    else:
        prev_dir = RD.stage_dir(run_dir, cfg, s - 1)
        prev_model = prev_dir / RD.MODEL
        if not prev_model.exists():
            raise RD.RunDirError(f"stage {stage.name!r} grows from {cfg.stages[s - 1].name!r}, which has not "
                                 f"finished ({prev_model} missing): run the earlier stage first")
        prev = torch.load(prev_model, map_location="cpu", weights_only=True)
        weights = grow_state_dict(prev, plan.layout(s - 1), plan.layout(s), plan.layouts[s][1],
                                  depth=stage.growth.depth, init=stage.growth.init,
                                  init_std=stage.model.init_std, seed=seed)
        data = stage_data(cfg, run_dir, s, tok, sha)
        windows = D.heldout_windows(data, stage.model.seq_len, stage.train.eval_tokens)
        exams = read_exams(data)
        before = evaluate_weights(plan, s - 1, prev, windows, exams, tok, stage.model.seq_len)
        after = evaluate_weights(plan, s, weights, windows, exams, tok, stage.model.seq_len)
        if stage.growth.optimizer == "carry" and (prev_dir / RD.MOMENTS).exists():
            m = torch.load(prev_dir / RD.MOMENTS, map_location="cpu", weights_only=True)
            grown = grow_moments(m["moments"], plan.layout(s - 1), plan.layout(s), plan.layouts[s][1])
            RD.write_atomic(sdir / RD.INIT_MOMENTS, {"moments": grown, "steps": m["steps"]})
        RD.write_atomic(sdir / RD.GROWTH, {
            "loss_prev_model": before["heldout_loss"], "loss_after_growth": after["heldout_loss"],
            "exam_prev_model": before.get("exam"), "exam_after_growth": after.get("exam"),
            "depth": stage.growth.depth, "placement": stage.growth.placement, "init": stage.growth.init,
            "optimizer": stage.growth.optimizer, NORM_EPS_KEY: PER_NORM_EPS if plan.per_norm_eps else ONE_EPS,
        })
    RD.write_atomic(init, weights)
    return init


__all__ = ["effective_multipliers", "evaluate_weights", "prepare_stage"]
