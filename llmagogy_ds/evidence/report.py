"""``llmagogy report RUN_DIR [--baseline RUN_DIR] [--out DIR]``: the method's evidence.

Writes ``report.md`` (this module) and PNG plots (``plots.py``) from a curriculum run directory
and, optionally, its from-scratch baseline (``llmagogy baseline``), both read by ``runs.py``:

* ``loss_vs_flops.png``: each stage's held-out and training loss against the curriculum's
  cumulative FLOPs, growth points marked (the previous model and the grown model on the new
  stage's held-out set);
* ``curriculum_vs_baseline.png``: one panel per stage's held-out set, curriculum and
  baseline on the same FLOPs axis and the *same* held-out windows;
* ``exams.png``: built-in exams, multiple-choice exams and minimal pairs at every stage end
  (and the baseline's);
* ``generations.png``: each generation's lr multiplier and drift at every stage.

Headline: the **FLOPs-to-target ratio** = the FLOPs the baseline needs to first reach the
curriculum's final held-out loss on the final stage's held-out set (linearly interpolated
between its evals) ÷ the curriculum's total FLOPs. Above 1 the curriculum got there with less
compute; "not reached" when the baseline never gets there.
"""
from __future__ import annotations

from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.evidence import experts as EX
from llmagogy_ds.evidence import plots as P
# the run readers and headline numbers live in runs.py; re-exported: `report` is the CLI's entry point
from llmagogy_ds.evidence.runs import (Baseline, Curriculum, comparison, curriculum_points, exam_series,
                                       flops_to_target, load_baseline, load_curriculum, mean_comparison,
                                       read_metrics, source_label)
from llmagogy_ds.fmt import md_table, num, pct, si
from llmagogy_ds.train.branch import read_experts

FLOPS_CONVENTION = ("training FLOPs = 6·N·T for the matmul weights of trainable generations, 4·N·T for frozen "
                    "ones (F = 0: no weight gradients), plus attention (12 · layers · seq_len · heads · head_dim "
                    "per token; PaLM's convention, the embedding lookup not counted). Held-out evaluations and "
                    "growth checks (forward only, 2·N·T + attention) are reported apart and are in no ratio; "
                    "exams are not counted.")


# --------------------------------------------------------------------------- report.md
def _headline(cur: Curriculum, base: Baseline | None, cmp: dict | None) -> list[str]:
    lines = ["## Headline", ""]
    n_done = sum(s.result is not None for s in cur.stages)
    rows = [["curriculum compute", f"{si(cur.total_flops, 'FLOPs')} ({n_done} of {cur.n_stages} stages"
             + ("" if cur.done else ", NOT FINISHED") + ")"]]
    side = cur.side_flops
    rows.append(["evaluation / growth checks (apart, not in any ratio)",
                 f"{si(side['eval'], 'FLOPs')} / {si(side['growth_check'], 'FLOPs')}"])
    final = cur.stages[-1]
    rows.append([f"curriculum final held-out loss ({final.name} set)",
                 num((final.result or {}).get("loss_end"))])
    if base is not None and cmp is not None:
        rows.append(["baseline compute", f"{si(base.flops, 'FLOPs')} ({base.flops / cur.total_flops:.2f} × the curriculum's)"
                     + ("" if base.result is not None else ", NOT FINISHED")])
        rows.append([f"baseline final held-out loss ({final.name} set)", num(base.final_loss(final.name))])
        if cmp["target"] is None:
            ratio = "curriculum not finished"
        elif cmp["reached"]:
            ratio = (f"**{cmp['ratio']:.2f}** (the baseline reaches {cmp['target']:.4f} at "
                     f"{si(cmp['flops_to_target'], 'FLOPs')})")
        else:
            ratio = (f"**not reached** (the baseline's best is {num(cmp['baseline_best'])} after "
                     f"{si(base.flops, 'FLOPs')}, so the ratio is > {base.flops / cur.total_flops:.2f})")
        rows.append(["FLOPs-to-target ratio", ratio])
        mean = mean_comparison(cur, base)
        rows.append(["FLOPs-to-target ratio, mean over every stage's set",
                     "- (needs the config's `eval:` section and a finished curriculum)" if mean["target"] is None
                     else f"**{mean['ratio']:.2f}** (target {mean['target']:.4f})" if mean["reached"]
                     else f"**not reached** (> {base.flops / cur.total_flops:.2f}; the baseline's best mean is "
                          f"{num(mean['baseline_best'])}, the target {mean['target']:.4f})"])
    lines += [md_table(["", ""], rows), ""]
    lines += [f"Compute convention: {FLOPS_CONVENTION}", ""]
    if cmp is not None:
        lines += ["FLOPs-to-target ratio = FLOPs the baseline needs to first reach the curriculum's final held-out "
                  f"loss on the `{final.name}` held-out set (linearly interpolated between its evals) ÷ the "
                  "curriculum's total FLOPs. Above 1, the curriculum reached that loss with less compute. Both are "
                  "scored on the same held-out windows (same packed data, tokenizer, seq_len and eval_tokens).", ""]
        if cmp["reached"] and cmp["flops_to_target"] == min((f for f, _ in base.curve(final.name)), default=None):
            lines += ["Note: the baseline was already at the target at its first eval; the ratio is an upper "
                      "bound (nothing earlier was measured).", ""]
    return lines


def _final_losses(cur: Curriculum, base: Baseline | None) -> list[str]:
    last = cur.stages[-1].result or {}
    final_eval = (last.get("eval") or {}).get("heldout") or {}
    headers = ["held-out set", "curriculum, end of that stage", "curriculum, final model"]
    if base is not None:
        headers.append("baseline, final")
    rows = []
    for st in cur.stages:
        own = (st.result or {}).get("loss_end")
        fin = own if st is cur.stages[-1] else (final_eval.get(st.name) or {}).get("loss")
        row = [st.name, num(own), num(fin)]
        if base is not None:
            row.append(num(base.final_loss(st.name)))
        rows.append(row)
    out = ["## Final held-out loss per stage corpus", "", md_table(headers, rows), ""]
    if not final_eval and len(cur.stages) > 1:
        out += ["(The curriculum's final model on earlier stages' sets needs the config's `eval:` section, "
                "which scores every stage's held-out set at every stage end.)", ""]
    return out


def _stage_table(cur: Curriculum) -> list[str]:
    rows = []
    for st in cur.stages:
        r = st.result
        if r is None:
            rows.append([st.name, "not finished"] + ["-"] * 6)
            continue
        exact = (r.get("growth") or {}).get("function_preserving")
        after = num(r.get("loss_after_growth")) + (" (not function-preserving)" if exact is False else "")
        rows.append([st.name, f"{r['n_params']:,}", f"{r['tokens']:,}", si(r["flops"], "FLOPs"), si(st.end, "FLOPs"),
                     after, num(r["loss_end"]), pct(r.get("exam_accuracy"))])
    return ["## Stages", "", md_table(["stage", "params", "tokens", "FLOPs", "cumulative FLOPs",
                                        "held-out loss after growth", "held-out loss at end", "own exam"], rows), ""]


def _epochs_table(cur: Curriculum) -> list[str]:
    rows = [[st.name, source_label(src), f"{ep:.3g}"] for st in cur.stages for src, ep in
            ((st.result or {}).get("epochs") or {}).items()]
    return ["## Epochs of each corpus per stage", "", md_table(["stage", "corpus", "epochs"], rows), ""]


def _generation_table(cur: Curriculum) -> list[str]:
    rows = []
    for st in cur.stages:
        for e in (st.result or {}).get("generations") or []:
            if e["generation"] == st.index:
                continue  # the stage's own generation: multiplier 1, no drift
            rows.append([st.name, f"{e['generation']} ({e['stage']})", num(e["multiplier"], "{:.4g}"),
                         num(e.get("chosen_F"), "{:.4g}"), num(e["drift"]), num(e["drift_sq"])])
    if not rows:
        return []
    return ["## Old generations: lr multiplier, chosen F, drift", "",
            md_table(["stage", "generation", "lr multiplier", "chosen F (drift budget)", "drift ‖Δθ‖/‖θ‖",
                       "drift Σ(Δθ)²/Σθ²"], rows), "",
            "The lr multiplier is the product of F over the transitions since the generation was added; "
            "chosen F is set when the stage used `freeze: {auto: true, drift_budget: ...}`.", ""]


def _exam_table(cur: Curriculum, base: Baseline | None) -> list[str]:
    series = exam_series(cur, base)
    if not series:
        return []
    headers = ["exam"] + [st.name for st in cur.stages] + (["baseline"] if base is not None else []) + ["chance"]
    rows = []
    for key, s in series.items():
        row = [key] + [pct(s["points"].get(st.index)) for st in cur.stages]
        if base is not None:
            row.append(pct(s["baseline"]))
        row.append(pct(s["chance"]))
        rows.append(row)
    return ["## Exams and minimal pairs at each stage end", "", md_table(headers, rows), "",
            "Built-in exams: exact match of the answer (held-out items). Multiple choice: arg-max of the "
            "summed log-likelihood. Minimal pairs: P(good) > P(bad).", ""]


def _lm_eval_table(cur: Curriculum) -> list[str]:
    """lm-evaluation-harness scores that `llmagogy eval --lm-eval` stored in each stage's eval.json."""
    cfg = RD.load_run_config(cur.run_dir)
    rows = []
    for st in cur.stages:
        lm = (RD.read_json(RD.stage_dir(cur.run_dir, cfg, st.index) / RD.EVAL) or {}).get("lm_eval") or {}
        shots = "task default" if lm.get("num_fewshot") is None else str(lm["num_fewshot"])
        for task, metrics in (lm.get("results") or {}).items():
            rows += [[st.name, task, k.split(",")[0], num(v, "{:.4f}"), shots] for k, v in metrics.items()
                     if "," in k and "stderr" not in k and isinstance(v, (int, float))]
    if not rows:
        return []
    return ["## lm-evaluation-harness", "", md_table(["stage", "task", "metric", "value", "shots"], rows), "",
            "`llmagogy eval --lm-eval` on each stage's exported model. lm-eval's `acc_norm` divides the "
            "log-likelihood by the choice's characters (our exams' `accuracy_norm`: per token).", ""]


def write_report(run_dir: Path, baseline_dir: Path | None = None, out: Path | None = None) -> dict:
    """Write ``report.md`` and the plots; returns the headline numbers and the files written."""
    cur = load_curriculum(Path(run_dir))
    base = load_baseline(Path(baseline_dir), cur) if baseline_dir is not None else None
    out = Path(out) if out is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    cmp = comparison(cur, base) if base is not None else None
    plots = {"loss_vs_flops": P.plot_loss_vs_flops(cur, out / "loss_vs_flops.png")}
    if base is not None:
        plots["curriculum_vs_baseline"] = P.plot_comparison(cur, base, cmp, out / "curriculum_vs_baseline.png")
    plots["exams"] = P.plot_exams(cur, base, out / "exams.png")
    plots["generations"] = P.plot_generations(cur, out / "generations.png")
    plots = {k: v for k, v in plots.items() if v is not None}
    md = [f"# Report: curriculum `{cur.name}`", "", f"- curriculum run: `{cur.run_dir}`"]
    if base is not None:
        md.append(f"- baseline run: `{base.run_dir}` (the final stage's architecture from scratch on every stage's "
                  "corpora)")
    md.append("")
    md += _headline(cur, base, cmp)
    md += _final_losses(cur, base)
    md += _stage_table(cur)
    md += _epochs_table(cur)
    md += _generation_table(cur)
    md += _exam_table(cur, base)
    md += _lm_eval_table(cur)
    if read_experts(run_dir):  # a trunk with expert branches: every model on every expert's held-out set
        md += EX.markdown(EX.side_by_side(Path(run_dir)))
    captions = {
        "loss_vs_flops": "Held-out loss (each stage on its own held-out set) and training loss against the "
                         "curriculum's cumulative FLOPs. Dotted lines: growth; ×: the previous model on the new "
                         "stage's held-out set, ○: the grown model on it.",
        "curriculum_vs_baseline": "Curriculum and baseline on each stage's held-out set, on the same FLOPs axis. "
                                  "Curriculum points outside a stage are stage-end evals (config `eval:`).",
        "exams": "Accuracy at each stage end; ★: the baseline's final model.",
        "generations": "Per-generation lr multiplier during each stage, and the drift of old generations over it.",
    }
    md += ["## Plots", ""]
    for key, p in plots.items():
        md += [f"![{key}]({p.name})", "", captions[key], ""]
    report = out / "report.md"
    RD.write_atomic(report, "\n".join(md))
    return {"report": report, "plots": plots, "comparison": cmp, "curriculum_flops": cur.total_flops}


__all__ = ["read_metrics", "load_curriculum", "load_baseline", "flops_to_target", "comparison", "write_report",
           "curriculum_points", "exam_series"]
