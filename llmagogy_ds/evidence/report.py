"""``llmagogy report RUN_DIR [--baseline RUN_DIR] [--out DIR]``: the method's evidence.

Writes ``report.md`` and PNG plots (matplotlib, Agg) from a curriculum run directory and,
optionally, its from-scratch baseline (``llmagogy baseline``):

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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from llmagogy_ds.evidence import baseline as B
from llmagogy_ds import rundir as RD
from llmagogy_ds.fmt import num, pct


# --------------------------------------------------------------------------- reading runs
def read_metrics(stage_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(evals, train)`` records of a stage's metrics.jsonl, in step order.

    A step logged again after a resume keeps its last record; resume events and drift records
    are left out. A line torn by a kill is skipped.
    """
    evals: dict[int, dict] = {}
    train: dict[int, dict] = {}
    f = Path(stage_dir) / "metrics.jsonl"
    if not f.exists():
        return [], []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("event") or "cumulative_flops" not in rec:
            continue
        if rec.get("heldout_loss") is not None:
            evals[rec["step"]] = rec
        elif rec.get("loss") is not None:
            train[rec["step"]] = rec
    return [evals[k] for k in sorted(evals)], [train[k] for k in sorted(train)]


@dataclass
class Stage:
    index: int
    name: str
    result: dict | None
    growth: dict | None
    offset: float  # the curriculum's FLOPs before this stage
    evals: list[dict] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)

    @property
    def flops(self) -> float:
        if self.result is not None:
            return self.result["flops"]
        return max((r["cumulative_flops"] for r in self.train + self.evals), default=0.0)  # still running

    @property
    def end(self) -> float:
        return self.offset + self.flops


@dataclass
class Curriculum:
    run_dir: Path
    name: str
    stages: list[Stage]  # the stages started so far
    n_stages: int  # in the config

    @property
    def done(self) -> bool:
        return len(self.stages) == self.n_stages and all(s.result is not None for s in self.stages)

    @property
    def total_flops(self) -> float:
        return sum(s.flops for s in self.stages if s.result is not None)


def load_curriculum(run_dir: Path) -> Curriculum:
    run_dir = Path(run_dir)
    cfg = RD.load_run_config(run_dir)
    stages, offset = [], 0.0
    for s, st in enumerate(cfg.stages):
        sdir = RD.stage_dir(run_dir, cfg, s)
        if not sdir.exists():
            break
        growth = json.loads((sdir / "growth.json").read_text()) if (sdir / "growth.json").exists() else None
        evals, train = read_metrics(sdir)
        stage = Stage(s, st.name, RD.stage_result(run_dir, cfg, s), growth, offset, evals, train)
        stages.append(stage)
        offset = stage.end
    if not any(s.result is not None for s in stages):
        raise RD.RunDirError(f"{run_dir}: no finished stage yet (no stages/NN_name/result.json): nothing to report")
    return Curriculum(run_dir, cfg.run.name, stages, len(cfg.stages))


@dataclass
class Baseline:
    run_dir: Path
    sets: list[str]  # the curriculum stages whose held-out sets it is scored on
    result: dict | None
    info: dict | None
    evals: list[dict]
    train: list[dict]

    def curve(self, name: str) -> list[tuple[float, float]]:
        key = f"heldout_loss/{name}"
        return [(r["cumulative_flops"], r[key]) for r in self.evals if r.get(key) is not None]

    def final_loss(self, name: str) -> float | None:
        c = self.curve(name)
        return c[-1][1] if c else None

    @property
    def flops(self) -> float:
        if self.result is not None:
            return self.result["flops"]
        return max((r["cumulative_flops"] for r in self.train + self.evals), default=0.0)


def load_baseline(run_dir: Path, curriculum: Curriculum | None = None) -> Baseline:
    """A baseline run; with ``curriculum``, also checks that both scored the same held-out sets."""
    from llmagogy_ds.evaluation.results import stage_cache

    run_dir = Path(run_dir)
    ccfg = RD.curriculum_config(run_dir)
    if ccfg is None:
        raise RD.RunDirError(f"{run_dir}: not a baseline run (no {RD.CURRICULUM}); make one with "
                            "`llmagogy baseline CONFIG --curriculum RUN_DIR`")
    cfg = RD.load_run_config(run_dir)
    if curriculum is not None:
        names = [s.name for s in curriculum.stages]
        if [s.name for s in ccfg.stages][: len(names)] != names:
            raise RD.RunDirError(f"{run_dir} is the baseline of curriculum stages "
                                f"{[s.name for s in ccfg.stages]}, not of {curriculum.run_dir} ({names})")
        # The cache directory's name is a fingerprint of the sources and the tokenizer: equal
        # names mean the same held-out tokens, hence comparable losses.
        for name in names:
            a, b = stage_cache(curriculum.run_dir, name), stage_cache(run_dir, name)
            if a is not None and b is not None and a.root.name != b.root.name:
                raise RD.RunDirError(f"the baseline {run_dir} and the curriculum {curriculum.run_dir} score stage "
                                    f"{name!r} on different held-out data ({b.root.name} vs {a.root.name}: other "
                                    "sources or another tokenizer); their losses are not comparable")
    sdir = RD.stage_dir(run_dir, cfg, 0)
    evals, train = read_metrics(sdir)
    return Baseline(run_dir, [s.name for s in ccfg.stages], RD.stage_result(run_dir, cfg, 0), B.baseline_info(run_dir),
                    evals, train)


# --------------------------------------------------------------------------- headline numbers
def flops_to_target(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a loss curve first reaches ``target`` (loss ≤ target), linearly
    interpolated between the evals on either side of the crossing; None when it never does.

    A curve already at the target at its first eval gives that eval's FLOPs: nothing earlier
    was measured, so it is an upper bound.
    """
    prev = None
    for f, loss in sorted((f, l) for f, l in points if l is not None and math.isfinite(l)):
        if loss <= target:
            if prev is None:
                return float(f)
            f0, l0 = prev
            return f0 + (l0 - target) / (l0 - loss) * (f - f0)
        prev = (f, loss)
    return None


def comparison(cur: Curriculum, base: Baseline) -> dict:
    """Target, FLOPs-to-target and its ratio on the final stage's held-out set."""
    final = cur.stages[-1]
    out = {"set": final.name, "curriculum_flops": cur.total_flops, "baseline_flops": base.flops,
           "target": None, "flops_to_target": None, "ratio": None, "reached": False,
           "baseline_best": None, "curriculum_done": cur.done}
    curve = base.curve(final.name)
    if curve:
        out["baseline_best"] = min(l for _, l in curve)
    if not cur.done:
        return out
    out["target"] = target = final.result["loss_end"]
    f = flops_to_target(curve, target)
    if f is not None:
        out.update(flops_to_target=f, ratio=f / cur.total_flops, reached=True)
    return out


# --------------------------------------------------------------------------- formatting
def _si(x: float | None, unit: str = "FLOPs") -> str:
    if x is None:
        return "-"
    for div, p in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(x) >= div:
            return f"{x / div:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _label(path: str) -> str:
    return Path(path).name if "/" in path else path


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _growth_lines(ax, cur: Curriculum, label: bool = True) -> None:
    for st in cur.stages[1:]:
        ax.axvline(st.offset, color="0.5", linestyle=":", linewidth=1)
        if label:
            ax.annotate(f"grow → {st.name}", (st.offset, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.35")


def plot_loss_vs_flops(cur: Curriculum, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = _colors(len(cur.stages))
    grow_labelled = False
    for st, c in zip(cur.stages, colors):
        if st.train:
            ax.plot([st.offset + r["cumulative_flops"] for r in st.train], [r["loss"] for r in st.train],
                    color=c, alpha=0.35, linewidth=1, label=f"{st.name}: training loss")
        xs = [st.offset + r["cumulative_flops"] for r in st.evals]
        ys = [r["heldout_loss"] for r in st.evals]
        g = st.growth or {}
        if g.get("loss_after_growth") is not None:
            xs, ys = [st.offset] + xs, [g["loss_after_growth"]] + ys
        if xs:
            ax.plot(xs, ys, color=c, marker="o", markersize=3.5, linewidth=1.8,
                    label=f"{st.name}: held-out loss ({st.name} set)")
        if g.get("loss_prev_model") is not None:
            ax.plot([st.offset], [g["loss_prev_model"]], linestyle="none", marker="x", color="k", markersize=8,
                    label=None if grow_labelled else "growth: previous model on the new set")
            ax.plot([st.offset], [g["loss_after_growth"]], linestyle="none", marker="o", markerfacecolor="none",
                    markeredgecolor="k", markersize=11,
                    label=None if grow_labelled else "growth: grown model on the new set")
            grow_labelled = True
    _growth_lines(ax, cur)
    ax.set_xlabel("cumulative training FLOPs (curriculum)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"curriculum {cur.name}: held-out loss vs compute, growth points marked")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curriculum_points(cur: Curriculum, name: str) -> list[tuple[float, float]]:
    """The curriculum's held-out loss on stage ``name``'s set against its cumulative FLOPs: the
    stage's own evals, the grown model at its start, and every stage-end ``eval`` that scored it."""
    pts = []
    for st in cur.stages:
        if st.name == name:
            if (st.growth or {}).get("loss_after_growth") is not None:
                pts.append((st.offset, st.growth["loss_after_growth"]))
            pts += [(st.offset + r["cumulative_flops"], r["heldout_loss"]) for r in st.evals]
        elif st.result is not None:
            h = ((st.result.get("eval") or {}).get("heldout") or {}).get(name) or {}
            if h.get("loss") is not None:
                pts.append((st.end, h["loss"]))
    return sorted(pts)


def plot_comparison(cur: Curriculum, base: Baseline, cmp: dict, path: Path) -> Path:
    plt = _pyplot()
    names = [s.name for s in cur.stages]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6), squeeze=False)
    for ax, name, c in zip(axes[0], names, _colors(len(names))):
        bc = base.curve(name)
        if bc:
            ax.plot(*zip(*bc), color="k", linestyle="--", marker=".", linewidth=1.4,
                    label="baseline (final architecture, from scratch)")
        cp = curriculum_points(cur, name)
        if cp:
            ax.plot(*zip(*cp), color=c, marker="o", markersize=3.5, linewidth=1.8, label="curriculum")
        _growth_lines(ax, cur, label=False)
        ax.axvline(cur.total_flops, color="tab:red", linewidth=1, alpha=0.6, label="curriculum's total FLOPs")
        if name == cmp["set"] and cmp["target"] is not None:
            ax.axhline(cmp["target"], color="tab:red", linestyle="--", linewidth=1,
                       label=f"target: curriculum's final loss {cmp['target']:.3f}")
            if cmp["reached"]:
                ax.plot([cmp["flops_to_target"]], [cmp["target"]], marker="*", markersize=14, color="tab:red",
                        linestyle="none", label=f"baseline reaches it: ratio {cmp['ratio']:.2f}")
        ax.set_title(f"held-out set of stage {name!r}")
        ax.set_xlabel("cumulative training FLOPs")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"curriculum {cur.name} vs from-scratch baseline, same held-out windows "
                 "(dotted lines: growth points)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def exam_series(cur: Curriculum, base: Baseline | None) -> dict[str, dict]:
    """``{series: {"kind", "points": {stage index: accuracy}, "baseline", "chance"}}`` for the
    built-in exams (exact match), multiple-choice exams and minimal pairs."""
    series: dict[str, dict] = {}

    def add(key, kind, i, acc, chance=None):
        s = series.setdefault(key, {"kind": kind, "points": {}, "baseline": None, "chance": chance})
        if i is None:
            s["baseline"] = acc
        else:
            s["points"][i] = acc

    for st in cur.stages:
        r = st.result or {}
        for name, acc in (r.get("exams_all_stages") or {}).items():
            add(f"{name} exam", "builtin", st.index, acc)
        ev = r.get("eval") or {}
        for p, e in (ev.get("exams") or {}).items():
            add(_label(p), "exam", st.index, e["accuracy"], e.get("chance"))
        for p, e in (ev.get("pairs") or {}).items():
            add(_label(p), "pairs", st.index, e["accuracy"], 0.5)
    ev = ((base.result or {}).get("eval") or {}) if base is not None else {}
    for name, h in (ev.get("heldout") or {}).items():
        if f"{name} exam" in series and (h.get("exam") or {}).get("accuracy") is not None:
            add(f"{name} exam", "builtin", None, h["exam"]["accuracy"])
    for p, e in (ev.get("exams") or {}).items():
        add(_label(p), "exam", None, e["accuracy"], e.get("chance"))
    for p, e in (ev.get("pairs") or {}).items():
        add(_label(p), "pairs", None, e["accuracy"], 0.5)
    order = {"builtin": 0, "exam": 1, "pairs": 2}
    return dict(sorted(series.items(), key=lambda kv: order[kv[1]["kind"]]))  # stable: stage order within a kind


def plot_exams(cur: Curriculum, base: Baseline | None, path: Path) -> Path | None:
    series = exam_series(cur, base)
    if not series:
        return None
    plt = _pyplot()
    panels = [k for k in ("builtin", "exam", "pairs") if any(s["kind"] == k for s in series.values())]
    titles = {"builtin": "built-in stage exams (exact match)", "exam": "multiple-choice exams",
              "pairs": "minimal pairs"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    names = [s.name for s in cur.stages]
    ticks = names + (["baseline"] if base is not None else [])
    for ax, kind in zip(axes[0], panels):
        items = [(k, s) for k, s in series.items() if s["kind"] == kind]
        for j, ((key, s), c) in enumerate(zip(items, _colors(len(items)))):
            xs = sorted(s["points"])
            ax.plot(xs, [s["points"][x] for x in xs], marker="o", color=c, label=key)
            if s["baseline"] is not None:  # side by side, so that equal accuracies stay visible
                dx = 0.1 * (j - (len(items) - 1) / 2)
                ax.plot([len(names) + dx], [s["baseline"]], marker="*", markersize=12, color=c, linestyle="none")
            if s["chance"] is not None:
                ax.axhline(s["chance"], color=c, linestyle=":", linewidth=1)
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlim(-0.4, len(ticks) - 0.6)
        ax.set_xlabel("end of stage" + (" (★: baseline)" if base is not None else ""))
        ax.set_ylabel("accuracy" + (" (dotted: chance)" if kind != "builtin" else ""))
        ax.set_ylim(0, 1.02 if kind != "builtin" else max(0.05, 1.15 * max(
            [v for _, s in items for v in [*s["points"].values(), s["baseline"] or 0]])))
        ax.set_title(titles[kind])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_generations(cur: Curriculum, path: Path) -> Path | None:
    done = [st for st in cur.stages if st.result is not None]
    if len(done) < 2:
        return None  # one stage has no old generation to slow down or to drift
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    n_gen = max(len(st.result["generations"]) for st in done)
    for g, c in zip(range(n_gen), _colors(n_gen)):
        rows = [(st.index, e) for st in done for e in st.result["generations"] if e["generation"] == g]
        label = f"gen {g} ({rows[0][1]['stage']})" if rows else f"gen {g}"
        a1.plot([i for i, _ in rows], [e["multiplier"] for _, e in rows], marker="o", color=c, label=label)
        old = [(i, e) for i, e in rows if i > g]
        if old:
            a2.plot([i for i, _ in old], [e["drift"] for _, e in old], marker="o", color=c,
                    label=f"{label}: ‖Δθ‖/‖θ‖")
            a2.plot([i for i, _ in old], [e["drift_sq"] for _, e in old], marker="s", linestyle="--", color=c,
                    label=f"{label}: Σ(Δθ)²/Σθ²")
    for st in done:
        b = (st.result.get("drift_budget") or {}).get("budget")
        if b is not None:
            a2.hlines(b, st.index - 0.3, st.index + 0.3, color="tab:red", linewidth=2,
                      label="drift budget (squared form)")
    names = [st.name for st in cur.stages]
    for ax in (a1, a2):
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel("stage")
        ax.grid(alpha=0.3)
    a1.set_ylabel("lr multiplier (product of F)")
    a1.set_title("per-generation lr multiplier during each stage")
    a1.set_ylim(0, 1.08)
    a2.set_ylabel("drift over the stage")
    a2.set_title("drift of old generations (end of stage vs start)")
    handles, labels = a2.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))  # one legend entry for the budget bars
    a2.legend(uniq.values(), uniq.keys(), fontsize=7)
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report.md
def _headline(cur: Curriculum, base: Baseline | None, cmp: dict | None) -> list[str]:
    lines = ["## Headline", ""]
    n_done = sum(s.result is not None for s in cur.stages)
    rows = [["curriculum compute", f"{_si(cur.total_flops)} ({n_done} of {cur.n_stages} stages"
             + ("" if cur.done else ", NOT FINISHED") + ")"]]
    final = cur.stages[-1]
    rows.append([f"curriculum final held-out loss ({final.name} set)",
                 num((final.result or {}).get("loss_end"))])
    if base is not None and cmp is not None:
        rows.append(["baseline compute", f"{_si(base.flops)} ({base.flops / cur.total_flops:.2f} × the curriculum's)"
                     + ("" if base.result is not None else ", NOT FINISHED")])
        rows.append([f"baseline final held-out loss ({final.name} set)", num(base.final_loss(final.name))])
        if cmp["target"] is None:
            ratio = "curriculum not finished"
        elif cmp["reached"]:
            ratio = (f"**{cmp['ratio']:.2f}** (the baseline reaches {cmp['target']:.4f} at "
                     f"{_si(cmp['flops_to_target'])})")
        else:
            ratio = (f"**not reached** (the baseline's best is {num(cmp['baseline_best'])} after "
                     f"{_si(base.flops)}, so the ratio is > {base.flops / cur.total_flops:.2f})")
        rows.append(["FLOPs-to-target ratio", ratio])
    lines += [_md_table(["", ""], rows), ""]
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
    out = ["## Final held-out loss per stage corpus", "", _md_table(headers, rows), ""]
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
        rows.append([st.name, f"{r['n_params']:,}", f"{r['tokens']:,}", _si(r["flops"]), _si(st.end),
                     num(r.get("loss_after_growth")), num(r["loss_end"]), pct(r.get("exam_accuracy"))])
    return ["## Stages", "", _md_table(["stage", "params", "tokens", "FLOPs", "cumulative FLOPs",
                                        "held-out loss after growth", "held-out loss at end", "own exam"], rows), ""]


def _epochs_table(cur: Curriculum) -> list[str]:
    rows = [[st.name, _label(src), f"{ep:.3g}"] for st in cur.stages for src, ep in
            ((st.result or {}).get("epochs") or {}).items()]
    return ["## Epochs of each corpus per stage", "", _md_table(["stage", "corpus", "epochs"], rows), ""]


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
            _md_table(["stage", "generation", "lr multiplier", "chosen F (drift budget)", "drift ‖Δθ‖/‖θ‖",
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
    return ["## Exams and minimal pairs at each stage end", "", _md_table(headers, rows), "",
            "Built-in exams: exact match of the answer (held-out items). Multiple choice: arg-max of the "
            "summed log-likelihood. Minimal pairs: P(good) > P(bad).", ""]


def write_report(run_dir: Path, baseline_dir: Path | None = None, out: Path | None = None) -> dict:
    """Write ``report.md`` and the plots; returns the headline numbers and the files written."""
    cur = load_curriculum(Path(run_dir))
    base = load_baseline(Path(baseline_dir), cur) if baseline_dir is not None else None
    out = Path(out) if out is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    cmp = comparison(cur, base) if base is not None else None
    plots = {"loss_vs_flops": plot_loss_vs_flops(cur, out / "loss_vs_flops.png")}
    if base is not None:
        plots["curriculum_vs_baseline"] = plot_comparison(cur, base, cmp, out / "curriculum_vs_baseline.png")
    plots["exams"] = plot_exams(cur, base, out / "exams.png")
    plots["generations"] = plot_generations(cur, out / "generations.png")
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
