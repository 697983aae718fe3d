"""The end of a stage (rank 0, after the final checkpoint and the ranks' weight shards, ``model/``):
exams (this stage's and every earlier one's, on this stage's final model), drift per
generation, the F a drift budget chose, the ``eval:`` section's scores, ``result.json`` and
the run's ``summary.json``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig, EvalConfig
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.prepare import read_exams, stage_data
from llmagogy_ds.evaluation.evaluate import exam_accuracy
from llmagogy_ds.evaluation.results import comparison_eval, evaluate_run, results_path
from llmagogy_ds.interop.export import export_stage
from llmagogy_ds.model.generations import generation_drift
from llmagogy_ds.model.layout import param_generations, param_shapes
from llmagogy_ds.parallel.engine import device_kind
from llmagogy_ds.train import checkpoint as C


def stage_end_eval(cfg: CurriculumConfig, run_dir: Path, s: int) -> dict | None:
    """The ``eval:`` section's scores of stage ``s``'s final model (``sdir/model/``), or None.

    ``evaluate_run``: loss and bits per byte on every stage's held-out set, the built-in
    exams, the configured multiple-choice exams, minimal pairs and texts (also ``eval.json``).
    A baseline run is always scored, and on the curriculum's held-out sets as well, so that
    its numbers sit beside the curriculum's. None when there is nothing to do (no ``eval:``
    section, or ``every_stage: false``), which keeps a plain stage end as cheap as before.
    """
    is_baseline = RD.curriculum_config(run_dir) is not None
    if not is_baseline and (cfg.eval is None or not cfg.eval.every_stage):
        return None
    ev = cfg.eval or EvalConfig()
    ckpt = RD.weights_at(RD.stage_dir(run_dir, cfg, s))
    res = evaluate_run(ckpt, exams=ev.exams, pairs=ev.pairs, texts=ev.texts, write=False)
    if is_baseline:
        res["heldout"].update(comparison_eval(run_dir, ckpt))
    res["output"] = str(results_path(ckpt))
    RD.write_atomic(res["output"], res)
    return RD.jsonable(res)


def generations_table(run, mults: dict, drift: dict) -> list[dict]:
    """Per generation: its lr multiplier at the end, size, drift, and the F a drift budget chose."""
    cfg, s, budget = run.cfg, run.s, run.budget
    gen_of, shapes = param_generations(run.layout), param_shapes(run.layout)
    gens = []
    for g in range(s + 1):
        n = sum(int(np.prod(shapes[k])) for k, gg in gen_of.items() if gg == g)
        entry = {"generation": g, "stage": cfg.stages[g].name, "multiplier": mults[g], "n_params": n,
                 "drift": drift[g]["drift"] if g in drift else 0.0,
                 "drift_sq": drift[g]["drift_sq"] if g in drift else 0.0}
        if budget is not None and g in budget.generations:  # the F the drift budget chose
            initial = run.mults[g]
            entry["initial_multiplier"] = initial
            entry["chosen_F"] = run.stage.freeze.value * mults[g] / initial if initial else 0.0
        gens.append(entry)
    return gens


def check_final(run, weights: RD.Weights) -> None:
    """The final weights hold every parameter of the stage's layout at its shape: never a stage
    end with holes (read from the shards' headers, not the tensors)."""
    shapes = param_shapes(run.layout)
    wrong = [f"{c} {weights.shape(c)} (layout: {tuple(s)})" for c, s in shapes.items()
             if c in weights and weights.shape(c) != tuple(s)]
    missing = sorted(set(shapes) - set(weights.keys()))
    if missing or wrong:
        raise C.CheckpointError(f"stage {run.stage.name}: the final weights do not match the layout: "
                                + "; ".join(f"{what}: {', '.join(v[:5])}{' …' if len(v) > 5 else ''}"
                                            for what, v in (("missing", missing), ("wrong shape", wrong)) if v))


def finish_stage(run) -> dict:
    """Rank 0, after the final checkpoint and the final weights' shards (``model/``)."""
    cfg, run_dir, s, stage, state = run.cfg, run.run_dir, run.s, run.stage, run.state
    sdir = run.sdir
    weights = RD.Weights(sdir / RD.MODEL_DIR)
    check_final(run, weights)
    mults = {**run.mults, **run.sched.generation_multipliers()}
    # drift streams both weights from their memory maps, one tensor at a time
    drift = generation_drift(run.init_weights, weights, param_generations(run.layout), s)
    model = run.plan.model(s)  # the exams score the whole model here, on rank 0 (small next to training)
    model.load_state_dict(weights.load())
    seq, tok = stage.model.seq_len, run.tok
    items = read_exams(run.data)
    exam = exam_accuracy(model, tok, items, seq) if items else None
    # retention: exams of every stage so far, on the final model of this stage
    exams_all = {}
    tok_sha = D.file_sha(RD.tokenizer_path(run_dir))
    for t in range(s):
        items = read_exams(stage_data(cfg, run_dir, t, tok, tok_sha))
        if items:
            exams_all[cfg.stages[t].name] = exam_accuracy(model, tok, items, seq)["accuracy"]
    if exam:
        exams_all[stage.name] = exam["accuracy"]
    growth = RD.read_json(sdir / RD.GROWTH) or {}
    layout, budget = run.layout, run.budget
    result = {
        "name": stage.name, "index": s, "n_params": run.n_total, "n_trainable": run.n_trainable,
        "layers": layout.n_layers, "hidden": layout.d_model, "heads": layout.n_heads, "ffn": layout.d_ffn,
        "steps": run.total_steps, "tokens": state["tokens"], "flops": state["flops"], "wall_seconds": state["wall"],
        # training FLOPs above (frozen generations 4·N·T, model/flops.py); evaluation and the growth check apart
        "eval_flops": state.get("eval_flops"), "growth_check_flops": growth.get("check_flops"),
        "growth": {k: growth.get(k) for k in ("depth", "init", "function_preserving")} if growth else None,
        "loss_prev_model": growth.get("loss_prev_model"), "loss_after_growth": growth.get("loss_after_growth"),
        "loss_at_start": state.get("loss_at_start"), "loss_end": run.final_loss,
        "exam_accuracy": exam["accuracy"] if exam else None,
        "exam_accuracy_after_growth": (growth.get("exam_after_growth") or {}).get("accuracy"),
        "exam_by_kind": exam.get("by_kind") if exam else None,
        "exams_all_stages": exams_all,
        "epochs": dict(zip([src["path"] for src in run.data.sources], run.sampler.epochs(state["samples"]))),
        "generations": generations_table(run, mults, drift),
        "drift_budget": None if budget is None else {"budget": budget.budget, "history": budget.history},
        "world_size": dist.get_world_size(), **run.layout_key, "device": device_kind(),
    }
    ev = stage_end_eval(cfg, run_dir, s)  # the config's `eval:` section (None without one)
    if ev is not None:
        result["eval"] = ev
    if cfg.export is not None and cfg.export.hf:  # `export:`: this stage as a HF LLaMA in sdir/hf
        result["export"] = str(export_stage(run_dir, s, None, cfg.export.dtype))
    RD.write_atomic(sdir / RD.RESULT, result)
    RD.write_summary(cfg, run_dir)
    return result


__all__ = ["stage_end_eval", "finish_stage", "check_final", "generations_table"]
