"""The evidence's figures (matplotlib, Agg, PNG files only): the report's loss, comparison, exam
and generation plots, and the size search's loss-vs-parameters plot."""
from __future__ import annotations

from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.evidence.runs import Baseline, Curriculum, curriculum_points, exam_series


# --------------------------------------------------------------------------- report
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out, write through the atomic writer (a kill leaves no half-written PNG) and close."""
    fig.tight_layout()
    try:
        RD.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _pyplot().close(fig)
    return path


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


# --------------------------------------------------------------------------- size search
def plot_size_search(report: dict, path: Path) -> Path:
    """Train and held-out loss of every candidate against its parameters, the recommended one starred."""
    plt = _pyplot()
    rs = sorted(report["candidates"], key=lambda r: r["params"])
    x = [r["params"] for r in rs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [r["heldout_loss"] for r in rs], "o-", color="tab:blue", label="held-out loss")
    ax.plot(x, [r["train_loss"] for r in rs], "s--", color="tab:orange", label="train loss (fixed training windows)")
    mem = [r for r in rs if r.get("memorizes")]
    if mem:
        ax.plot([r["params"] for r in mem], [r["heldout_loss"] for r in mem], "x", color="tab:red", ms=12, mew=2,
                label="memorizes (gap over the limit)")
    for i, r in enumerate(rs):  # labels alternate above and below: neighbours on the ladder can be close
        ax.annotate(r["label"], (r["params"], r["heldout_loss"]), textcoords="offset points",
                    xytext=(0, 8 if i % 2 == 0 else -14), ha="center", fontsize=8)
    rec = report["recommendation"]
    chosen = report["candidates"][rec["index"]]
    ax.plot([chosen["params"]], [chosen["heldout_loss"]], "*", color="tab:green", ms=20, zorder=5,
            label=f"recommended: {chosen['label']}" + ("" if rec["status"] == "ok" else " (all memorize)"))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"size search, stage {report['stage']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi=110)




# --------------------------------------------------------------------------- sweep
def plot_sweep(rows: list[dict], sets: list[str], path: Path, baseline: dict | None = None) -> Path:
    """The sweep's figure (``sweep.py``). Top: both FLOPs-to-target ratios per variant (hatched:
    not reached, drawn at the baseline's compute multiple, a lower bound), and each variant's final
    held-out loss on every stage's set. Bottom: held-out loss against training FLOPs on the final
    stage's set and on the mean set, every variant beside the baseline's curve (``baseline``:
    ``{"final": points, "mean": points}``), a star where the baseline reaches a variant's target."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.6), gridspec_kw={"width_ratios": [1, 1.6]})
    (ax_r, ax_l), curve_axes = axes
    _sweep_curves(curve_axes, rows, sets[-1], baseline)
    names = [r["variant"] for r in rows]
    colors = _colors(len(rows))
    xs = range(len(rows))
    for off, key, label in ((-0.2, "ratio_final", "final stage's set"), (0.2, "ratio_mean", "mean over stage sets")):
        for i, r in enumerate(rows):
            cmp = r[key]
            if cmp is None or cmp["target"] is None:
                continue
            val = cmp["ratio"] if cmp["reached"] else cmp["baseline_flops"] / cmp["curriculum_flops"]
            ax_r.bar(i + off, val, width=0.38, color=colors[i], alpha=1.0 if key == "ratio_final" else 0.55,
                     hatch=None if cmp["reached"] else "//", edgecolor="k", linewidth=0.6)
            ax_r.annotate(f"{'' if cmp['reached'] else '>'}{val:.2f}", (i + off, val), ha="center", va="bottom",
                          fontsize=7)
    if not any(r[k] and r[k]["target"] is not None for r in rows for k in ("ratio_final", "ratio_mean")):
        ax_r.text(0.5, 0.5, "no ratio: no finished baseline\n(the sweep file's `baseline:`)", ha="center",
                  va="center", transform=ax_r.transAxes, fontsize=9, color="0.4")
    ax_r.set_xlim(-0.6, len(rows) - 0.4)
    ax_r.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax_r.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax_r.set_ylabel("FLOPs-to-target ratio (baseline ÷ variant)")
    ax_r.set_title("ratio: left bar final set, right bar mean set; hatched: not reached (>)", fontsize=9)
    ax_r.grid(alpha=0.3, axis="y")
    cols = sets + ["mean"]
    width = 0.8 / max(1, len(rows))
    for i, (r, c) in enumerate(zip(rows, colors)):
        fl = r["final_losses"]
        vals = [fl.get(s) for s in sets]
        vals.append(sum(vals) / len(vals) if all(v is not None for v in vals) else None)
        pos = [j + (i - (len(rows) - 1) / 2) * width for j, v in enumerate(vals) if v is not None]
        ax_l.bar(pos, [v for v in vals if v is not None], width=width, color=c, label=r["variant"])
    ax_l.set_xticks(range(len(cols)), cols, fontsize=8)
    ax_l.set_ylabel("final model's held-out loss (nats/token)")
    ax_l.set_title("final held-out loss per stage corpus (lower is better)", fontsize=9)
    ax_l.grid(alpha=0.3, axis="y")
    ax_l.legend(fontsize=7, ncol=2)
    lows = [v for r in rows for v in r["final_losses"].values()]
    if lows:
        ax_l.set_ylim(min(lows) * 0.95, max(lows) * 1.03)
    return _save(fig, path)


def _sweep_curves(axes, rows: list[dict], final: str, baseline: dict | None) -> None:
    colors = _colors(len(rows))
    for ax, key, title in ((axes[0], "final", f"final stage's set ({final})"), (axes[1], "mean", "mean over stage sets")):
        if baseline and baseline[key]:
            ax.plot(*zip(*baseline[key]), color="k", linestyle="--", linewidth=1.4, label="baseline (from scratch)")
        for r, c in zip(rows, colors):
            pts = r[f"curve_{key}"]
            if pts:
                ax.plot(*zip(*pts), color=c, marker="o", markersize=2.5, linewidth=1.2, label=r["variant"])
            cmp = r[f"ratio_{key}"]
            if cmp and cmp["reached"]:
                ax.plot([cmp["flops_to_target"]], [cmp["target"]], marker="*", markersize=11, color=c, linestyle="none")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative training FLOPs (log)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.plot([], [], marker="*", markersize=9, color="0.4", linestyle="none", label="baseline reaches its final loss")
        ax.set_title(f"held-out loss vs training FLOPs: {title}", fontsize=9)
        ends = [p[1] for r in rows for p in r[f"curve_{key}"][-1:]] + [p[1] for p in (baseline or {}).get(key, [])[-1:]]
        if ends:  # the early, high losses would squash the region where the curves cross
            ax.set_ylim(min(ends) * 0.97, max(ends) * 1.35)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)


__all__ = ["plot_loss_vs_flops", "plot_comparison", "plot_exams", "plot_generations", "plot_size_search",
           "plot_sweep"]
