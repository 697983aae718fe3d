"""A curriculum run and its from-scratch baseline as read from their run directories, and the
series and headline numbers (FLOPs-to-target) that the report and its plots are made of."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from llmagogy_ds import rundir as RD
from llmagogy_ds.evidence import baseline as B
from llmagogy_ds.train.metrics import read_records


# --------------------------------------------------------------------------- reading runs
def read_metrics(stage_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(evals, train)`` records of a stage's metrics.jsonl, in step order.

    A step logged again after a resume keeps its last record; resume events and drift records
    are left out. A line torn by a kill is skipped.
    """
    evals: dict[int, dict] = {}
    train: dict[int, dict] = {}
    for rec in read_records(Path(stage_dir) / RD.METRICS):
        if rec.get("event") or "cumulative_flops" not in rec:
            continue
        if rec.get("heldout_loss") is not None:
            evals[rec["step"]] = rec
        elif rec.get("loss") is not None:
            train[rec["step"]] = rec
    return [evals[k] for k in sorted(evals)], [train[k] for k in sorted(train)]


def _flops(result: dict | None, records: list[dict]) -> float:
    """A stage's FLOPs: its result's, or the last logged while it is still running."""
    if result is not None:
        return result["flops"]
    return max((r["cumulative_flops"] for r in records), default=0.0)


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
        return _flops(self.result, self.train + self.evals)

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

    @property
    def side_flops(self) -> dict[str, float]:
        """Evaluation and growth-check FLOPs of the finished stages, apart from training's."""
        done = [s.result for s in self.stages if s.result is not None]
        return {"eval": sum(r.get("eval_flops") or 0.0 for r in done),
                "growth_check": sum(r.get("growth_check_flops") or 0.0 for r in done)}


def load_curriculum(run_dir: Path) -> Curriculum:
    run_dir = Path(run_dir)
    cfg = RD.load_run_config(run_dir)
    stages, offset = [], 0.0
    for s, st in enumerate(cfg.stages):
        sdir = RD.stage_dir(run_dir, cfg, s)
        if not sdir.exists():
            break
        growth = RD.read_json(sdir / RD.GROWTH)
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

    def mean_curve(self, names: Sequence[str]) -> list[tuple[float, float]]:
        """The mean over ``names``' held-out sets at every eval that scored all of them."""
        return [(r["cumulative_flops"], sum(r[f"heldout_loss/{n}"] for n in names) / len(names)) for r in self.evals
                if all(r.get(f"heldout_loss/{n}") is not None for n in names)]

    def final_loss(self, name: str) -> float | None:
        c = self.curve(name)
        return c[-1][1] if c else None

    @property
    def flops(self) -> float:
        return _flops(self.result, self.train + self.evals)


def load_baseline(run_dir: Path, curriculum: Curriculum | None = None) -> Baseline:
    """A baseline run; with ``curriculum``, also checks that both scored the same held-out sets."""
    from llmagogy_ds.data.corpus import same_heldout
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
        # the same held-out tokens (equal cache fingerprints, or equal streams), hence comparable losses
        for name in names:
            a, b = stage_cache(curriculum.run_dir, name), stage_cache(run_dir, name)
            if a is not None and b is not None and not same_heldout(a, b):
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


def final_heldout(cur: Curriculum) -> dict[str, float]:
    """The curriculum's final model's held-out loss on every stage's set: the final stage's own
    (``loss_end``) and, where the config has an ``eval:`` section, the stage-end eval's others."""
    last = cur.stages[-1].result or {}
    out = {k: v["loss"] for k, v in ((last.get("eval") or {}).get("heldout") or {}).items()
           if (v or {}).get("loss") is not None}
    if last.get("loss_end") is not None:
        out[cur.stages[-1].name] = last["loss_end"]
    return out


def mean_comparison(cur: Curriculum, base: Baseline) -> dict:
    """FLOPs-to-target ratio on the mean over every stage's held-out set: the target is the mean
    of the curriculum's final losses on them, the baseline's curve the mean at each of its evals
    that scored every set. ``target`` None when the final model was not scored on every set (the
    config needs an ``eval:`` section)."""
    names = [s.name for s in cur.stages]
    out = {"set": "mean", "sets": names, "target": None, "flops_to_target": None, "ratio": None, "reached": False,
           "baseline_best": None, "curriculum_flops": cur.total_flops, "baseline_flops": base.flops}
    curve = base.mean_curve(names)
    if curve:
        out["baseline_best"] = min(l for _, l in curve)
    final = final_heldout(cur)
    if not cur.done or any(n not in final for n in names):
        return out
    out["target"] = target = sum(final[n] for n in names) / len(names)
    f = flops_to_target(curve, target)
    if f is not None:
        out.update(flops_to_target=f, ratio=f / cur.total_flops, reached=True)
    return out


# --------------------------------------------------------------------------- series
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


def curriculum_mean_points(cur: Curriculum) -> list[tuple[float, float]]:
    """The curriculum's mean held-out loss over every stage's set against its cumulative FLOPs,
    at each stage end whose eval scored every set (the config's ``eval: {every_stage: true}``)."""
    names = [s.name for s in cur.stages]
    pts = []
    for st in cur.stages:
        if st.result is None:
            continue
        losses = {k: (v or {}).get("loss") for k, v in ((st.result.get("eval") or {}).get("heldout") or {}).items()}
        losses[st.name] = st.result.get("loss_end")
        if all(losses.get(n) is not None for n in names):
            pts.append((st.end, sum(losses[n] for n in names) / len(names)))
    return pts


def source_label(path: str) -> str:
    """A source or eval file as the report names it: its file name, else the name as given."""
    return Path(path).name if "/" in path else path


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

    def add_eval(ev, i):  # the config's eval section: multiple-choice exams and minimal pairs
        for p, e in (ev.get("exams") or {}).items():
            add(source_label(p), "exam", i, e["accuracy"], e.get("chance"))
        for p, e in (ev.get("pairs") or {}).items():
            add(source_label(p), "pairs", i, e["accuracy"], 0.5)

    for st in cur.stages:
        r = st.result or {}
        for name, acc in (r.get("exams_all_stages") or {}).items():
            add(f"{name} exam", "builtin", st.index, acc)
        add_eval(r.get("eval") or {}, st.index)
    ev = ((base.result or {}).get("eval") or {}) if base is not None else {}
    for name, h in (ev.get("heldout") or {}).items():
        if f"{name} exam" in series and (h.get("exam") or {}).get("accuracy") is not None:
            add(f"{name} exam", "builtin", None, h["exam"]["accuracy"])
    add_eval(ev, None)
    order = {"builtin": 0, "exam": 1, "pairs": 2}
    return dict(sorted(series.items(), key=lambda kv: order[kv[1]["kind"]]))  # stable: stage order within a kind


__all__ = ["read_metrics", "Stage", "Curriculum", "load_curriculum", "Baseline", "load_baseline",
           "flops_to_target", "comparison", "mean_comparison", "final_heldout", "curriculum_points",
           "curriculum_mean_points", "exam_series"]
