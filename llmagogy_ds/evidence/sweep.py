"""``llmagogy sweep SWEEP.yaml``: curriculum variants (growth operator, F, per-stage budgets,
growth schedule) trained one after another, every stage that a variant shares with another
reused instead of trained again, and one table and one figure comparing them.

A sweep file::

    config: graded.yaml                # the curriculum every variant starts from (relative to this file)
    out: ../runs/graded-sweep          # optional; default runs/<sweep file name>
    set: {eval.every_stage: true}      # optional: --set overrides for every variant
    baseline: default                  # optional: train this variant's from-scratch baseline and
                                       # compare every variant with it (both FLOPs-to-target ratios)
    variants:
      - {name: default}
      - name: F08
        description: F = 0.8 at every transition
        set: {defaults.freeze: 0.8}    # --set overrides (values as YAML), applied after the common ones

**Shared stages.** Stage k of a variant is the same computation as stage k of another when
their configs agree on everything that stage k can see: stages 0..k merged with the defaults,
the run's seed and every other top-level section, and the data of every stage (the tokenizer is
trained on all of them). Such a stage is trained once; the other variants get its finished stage
directory hard-linked (checkpoints left out: a stage with ``result.json`` is done and never
resumed), and the next stage grows from it as from its own. The tokenizer and the token caches
are linked the same way. ``sweep.json`` records which stages each variant trained and which it
reused, and from where.

Each variant is a run directory ``OUT/<name>`` (its frozen config's ``run.name`` is
``<run.name>-<name>``), resumable like any run: re-running the sweep resumes where it stopped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import ConfigError, CurriculumConfig, load_config
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.evidence import baseline as B
from llmagogy_ds.evidence import plots as P
from llmagogy_ds.evidence.runs import (comparison, curriculum_mean_points, curriculum_points, final_heldout,
                                       load_baseline, load_curriculum, mean_comparison, source_label)
from llmagogy_ds.fmt import num, pct, si
from llmagogy_ds.interop.import_hf import prepare_hf
from llmagogy_ds.train.branch import link_file, link_tree, stage_keys, tokenizer_key

SWEEP_KEYS = ("config", "out", "set", "baseline", "variants")
VARIANT_KEYS = ("name", "description", "set")
BASELINE_DIR = "baseline"
RECORD, TABLE, FIGURE = "sweep.json", "sweep.md", "sweep.png"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

RunStage = Callable[[Path, str, int, list], int]  # cluster.launcher.run_stage: (run_dir, stage, nproc, extra) -> rc


class SweepError(ValueError):
    """A bad sweep file or a failed variant; the message names the file, variant and reason."""


@dataclass
class Variant:
    name: str
    description: str
    overrides: list[str]
    cfg: CurriculumConfig
    run_dir: Path


@dataclass
class Sweep:
    path: Path
    config: Path
    out: Path
    variants: list[Variant]
    baseline: str | None = None
    record: dict = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def baseline_dir(self) -> Path:
        return self.out / BASELINE_DIR


# --------------------------------------------------------------------------- the sweep file
def _overrides(block, where: str) -> list[str]:
    """A ``set:`` mapping as ``--set`` strings (values as JSON, which YAML reads back as given)."""
    if block is None:
        return []
    if not isinstance(block, dict) or not all(isinstance(k, str) for k in block):
        raise SweepError(f"{where}.set: expected a mapping of config keys to values, got {block!r}")
    return [f"{k}={json.dumps(v)}" for k, v in block.items()]


def load_sweep(path: Path, out: Path | None = None) -> Sweep:
    """Read a sweep file and build and check every variant's config, all before any compute."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"{path}: sweep file not found") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: YAML syntax error: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: top level must be a mapping with config and variants")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(SWEEP_KEYS)})")
    if not isinstance(raw.get("config"), str):
        raise SweepError(f"{path}: config: missing (the curriculum YAML every variant starts from)")
    config = (path.parent / raw["config"]).resolve()
    out = Path(out) if out is not None else (path.parent / raw["out"] if raw.get("out") else Path("runs") / path.stem)
    common = _overrides(raw.get("set"), f"{path}")
    items = raw.get("variants")
    if not isinstance(items, list) or not items:
        raise SweepError(f"{path}: variants: expected a non-empty list")
    variants: list[Variant] = []
    for i, item in enumerate(items):
        where = f"{path}: variants[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise SweepError(f"{where}: expected a mapping with a name")
        name = item["name"]
        where = f"{where} ({name})"
        bad = sorted(set(item) - set(VARIANT_KEYS))
        if bad:
            raise SweepError(f"{where}: unknown key(s) {', '.join(bad)} (allowed: {', '.join(VARIANT_KEYS)})")
        if not _NAME.fullmatch(name) or name == BASELINE_DIR:
            raise SweepError(f"{where}.name: must be letters, digits, '_', '.' or '-' and not {BASELINE_DIR!r}")
        if any(v.name == name for v in variants):
            raise SweepError(f"{where}.name: used twice")
        base_name = yaml.safe_load(config.read_text(encoding="utf-8")).get("run", {}).get("name", "run") \
            if config.exists() else "run"
        overrides = [f"run.name={json.dumps(f'{base_name}-{name}')}"] + common + _overrides(item.get("set"), where)
        try:
            cfg = load_config(config, overrides)
        except ConfigError as e:
            raise SweepError(f"{where}: {e}") from None
        variants.append(Variant(name, str(item.get("description") or ""), overrides, cfg, out / name))
    baseline = raw.get("baseline")
    if baseline is not None:
        names = [v.name for v in variants]
        if baseline not in names:
            raise SweepError(f"{path}: baseline: {baseline!r} is not a variant ({', '.join(names)})")
        stages = [s.name for s in next(v for v in variants if v.name == baseline).cfg.stages]
        for v in variants:
            if [s.name for s in v.cfg.stages] != stages:
                raise SweepError(f"{path}: variants[{names.index(v.name)}] ({v.name}): stages "
                                 f"{[s.name for s in v.cfg.stages]} differ from the baseline variant's {stages}: "
                                 "one baseline scores every variant on the same stage sets")
    done = (RD.read_json(out / RECORD) or {}).get("variants", {})  # what earlier runs of the sweep trained, reused
    return Sweep(path, config, out, variants, baseline, {"variants": done})


# --------------------------------------------------------------------------- shared stages
# stage_keys / tokenizer_key (what a stage and a tokenizer depend on) and link_tree (a finished stage
# hard-linked into another run dir) are train/branch.py's: an expert branch reuses a trunk's stages
# the same way.
def donor_stage(sweep: Sweep, v: Variant, s: int) -> Variant | None:
    """Another variant that finished stage ``s`` with the same key, if any."""
    key = stage_keys(v.cfg)[s]
    for o in sweep.variants:
        if o is not v and len(o.cfg.stages) > s and stage_keys(o.cfg)[s] == key \
                and RD.stage_result(o.run_dir, o.cfg, s) is not None:
            return o
    return None


def prepare_variant(sweep: Sweep, v: Variant) -> None:
    """Open the variant's run dir and prepare tokenizer and data (linked from a variant with the
    same tokenizer inputs when one has them)."""
    RD.open_run_dir(v.cfg, v.run_dir, until_prepared=True)
    tok = RD.tokenizer_path(v.run_dir)
    if not tok.exists():
        for o in sweep.variants:
            if o is not v and tokenizer_key(o.cfg) == tokenizer_key(v.cfg) and RD.tokenizer_path(o.run_dir).exists():
                link_file(RD.tokenizer_path(o.run_dir), tok)
                if RD.data_root(o.run_dir).is_dir() and not RD.data_root(v.run_dir).exists():
                    link_tree(RD.data_root(o.run_dir), RD.data_root(v.run_dir))
                break
    prepare_hf(v.cfg, v.run_dir)
    DP.prepare_data(v.cfg, v.run_dir)
    RD.mark_prepared(v.run_dir)


def run_variant(sweep: Sweep, v: Variant, run_stage: RunStage, log=print) -> bool:
    """Every stage of ``v``: done already, reused from another variant, or trained. False when a
    stage stopped before its end (re-run to resume)."""
    prepare_variant(sweep, v)
    rec = sweep.record.setdefault("variants", {}).setdefault(v.name, {"trained": [], "reused": {}})
    rec.update(run_dir=str(v.run_dir), description=v.description, overrides=v.overrides)
    for s, st in enumerate(v.cfg.stages):
        if RD.stage_result(v.run_dir, v.cfg, s) is not None:
            continue
        sdir = RD.stage_dir(v.run_dir, v.cfg, s)
        # a stage this variant started itself (killed) resumes: nothing of a run is thrown away
        donor = None if sdir.exists() else donor_stage(sweep, v, s)
        if donor is not None:
            sdir.parent.mkdir(parents=True, exist_ok=True)
            link_tree(RD.stage_dir(donor.run_dir, donor.cfg, s), sdir, skip=(RD.CHECKPOINTS,))
            rec["reused"][st.name] = donor.name
            log(f"[llmagogy] sweep {v.name}: stage {st.name} is {donor.name}'s (same config so far): reused")
        else:
            log(f"[llmagogy] sweep {v.name}: stage {s} {st.name}: training ({st.train.nproc} process(es))")
            rc = run_stage(v.run_dir, st.name, st.train.nproc, [])
            if rc != 0:
                raise SweepError(f"variant {v.name}: stage {st.name} failed (exit {rc}); re-run the sweep to resume")
            if RD.stage_result(v.run_dir, v.cfg, s) is None:
                return False
            if st.name not in rec["trained"]:
                rec["trained"].append(st.name)
        RD.write_atomic(sweep.out / RECORD, sweep.record)
    RD.write_summary(v.cfg, v.run_dir)
    RD.write_atomic(sweep.out / RECORD, sweep.record)
    return True


def run_baseline(sweep: Sweep, run_stage: RunStage, log=print) -> bool:
    """The baseline variant's from-scratch baseline (``llmagogy baseline``), in ``OUT/baseline``."""
    v = sweep.variant(sweep.baseline)
    derived, info = B.prepare_baseline(v.cfg, sweep.baseline_dir, v.run_dir)
    if RD.stage_result(sweep.baseline_dir, derived, 0) is None:
        stage = derived.stages[0]
        log(f"[llmagogy] sweep: baseline of {v.name}: {si(info['baseline_flops'], 'FLOPs')} "
            f"({info['baseline_flops'] / info['curriculum_flops']:.2f} x its curriculum's)")
        rc = run_stage(sweep.baseline_dir, stage.name, stage.train.nproc, [])
        if rc != 0:
            raise SweepError(f"baseline: failed (exit {rc}); re-run the sweep to resume")
        if RD.stage_result(sweep.baseline_dir, derived, 0) is None:
            return False
    RD.write_summary(derived, sweep.baseline_dir)
    return True


def run_sweep(sweep: Sweep, run_stage: RunStage, only: list[str] | None = None, log=print) -> dict:
    """Train (or resume) the variants in order, then the baseline; then the table and figure."""
    names = [v.name for v in sweep.variants]
    bad = [n for n in only or [] if n not in names]
    if bad:
        raise SweepError(f"--only: no variant {', '.join(map(repr, bad))} (variants: {', '.join(names)})")
    sweep.out.mkdir(parents=True, exist_ok=True)
    finished = True
    for v in sweep.variants:
        if only and v.name not in only:
            continue
        if not run_variant(sweep, v, run_stage, log):
            log(f"[llmagogy] sweep {v.name}: a stage stopped before its end; re-run the sweep to resume")
            finished = False
            break
    if finished and sweep.baseline and (not only or sweep.baseline in only):
        finished = run_baseline(sweep, run_stage, log)
    return write_sweep_report(sweep)


# --------------------------------------------------------------------------- table and figure
def _ratio_cell(cmp: dict | None) -> str:
    if cmp is None or cmp["target"] is None:
        return "-"
    if cmp["reached"]:
        return f"{cmp['ratio']:.2f}"
    return f"not reached at {cmp['baseline_flops'] / cmp['curriculum_flops']:.2f}×"


def finished_baseline(sweep: Sweep, cur=None):
    """The sweep's baseline once it has finished (checked against ``cur`` when given), else None."""
    if sweep.baseline and RD.frozen_config_path(sweep.baseline_dir).exists() \
            and RD.stage_result(sweep.baseline_dir, RD.load_run_config(sweep.baseline_dir), 0) is not None:
        return load_baseline(sweep.baseline_dir, cur)
    return None


def variant_row(sweep: Sweep, v: Variant) -> dict | None:
    """One variant's numbers (None before its first finished stage)."""
    try:
        cur = load_curriculum(v.run_dir)
    except RD.RunDirError:
        return None
    base = finished_baseline(sweep, cur)
    last = cur.stages[-1].result or {}
    pairs = {source_label(p): e["accuracy"] for p, e in ((last.get("eval") or {}).get("pairs") or {}).items()}
    drift = {e["stage"]: e["drift"] for e in last.get("generations") or [] if e["generation"] != cur.stages[-1].index}
    rec = (sweep.record.get("variants") or {}).get(v.name) or {}
    return {"variant": v.name, "description": v.description, "done": cur.done, "flops": cur.total_flops,
            **{f"{k}_flops": x for k, x in cur.side_flops.items()},
            "ratio_final": comparison(cur, base) if base else None,
            "ratio_mean": mean_comparison(cur, base) if base else None,
            "final_losses": final_heldout(cur), "pairs": pairs, "drift": drift,
            "curve_final": curriculum_points(cur, cur.stages[-1].name), "curve_mean": curriculum_mean_points(cur),
            "growth": {st.name: (st.result or {}).get("growth") for st in cur.stages[1:]},
            "trained": rec.get("trained", []), "reused": rec.get("reused", {})}


def write_sweep_report(sweep: Sweep) -> dict:
    """``sweep.md`` (one table), ``sweep.png`` (one figure) and ``sweep.json`` in the sweep's out dir."""
    rows = [r for r in (variant_row(sweep, v) for v in sweep.variants) if r is not None]
    sets = [s.name for s in sweep.variants[0].cfg.stages]
    pair_names = sorted({k for r in rows for k in r["pairs"]})
    headers = (["variant", "training FLOPs", "ratio (final set)", "ratio (mean set)"] + [f"loss {s}" for s in sets]
               + ["loss mean"] + pair_names + ["drift of old generations", "stages trained / reused"])
    lines = []
    for r in rows:
        fl = r["final_losses"]
        mean = sum(fl[s] for s in sets) / len(sets) if all(s in fl for s in sets) else None
        drift = ", ".join(f"{k} {x:.3f}" for k, x in r["drift"].items()) or "-"
        tr = f"{', '.join(r['trained']) or '-'} / " + (", ".join(f"{k} ← {d}" for k, d in r["reused"].items()) or "-")
        inexact = [k for k, g in r["growth"].items() if g and g.get("function_preserving") is False]
        name = r["variant"] + "".join(f" (growth into {k} not function-preserving)" for k in inexact)
        cells = ([name + ("" if r["done"] else " (NOT FINISHED)"), si(r["flops"], "FLOPs"),
                  _ratio_cell(r["ratio_final"]), _ratio_cell(r["ratio_mean"])] + [num(fl.get(s)) for s in sets]
                 + [num(mean)] + [pct(r["pairs"].get(p)) for p in pair_names] + [drift, tr])
        lines.append("| " + " | ".join(cells) + " |")
    md = [f"# Sweep `{sweep.path.name}` over `{sweep.config.name}`", "",
          "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *lines, "",
          "Ratio = FLOPs the baseline needs to first reach the variant's final held-out loss ÷ the variant's "
          "training FLOPs, on the final stage's set and on the mean over every stage's set (the baseline: "
          f"`{sweep.baseline or 'none'}`'s, from scratch). Losses: each variant's final model on every stage's "
          "held-out set (needs the config's `eval:` section); minimal pairs: its accuracy. "
          "Drift: ‖Δθ‖/‖θ‖ of each old generation over the final stage. A growth that is not "
          "function-preserving is named beside its variant (its stages' result.json: `growth`).", "",
          *[f"- `{r['variant']}`: {r['description']}" for r in rows if r["description"]], ""]
    RD.write_atomic(sweep.out / TABLE, "\n".join(md))
    base = finished_baseline(sweep)
    curves = {"final": base.curve(sets[-1]), "mean": base.mean_curve(sets)} if base else None
    figure = P.plot_sweep(rows, sets, sweep.out / FIGURE, curves) if rows else None
    out = {**sweep.record, "rows": rows, "table": str(sweep.out / TABLE), "figure": str(figure) if figure else None}
    RD.write_atomic(sweep.out / RECORD, out)
    return out


__all__ = ["Sweep", "Variant", "SweepError", "load_sweep", "stage_keys", "tokenizer_key", "run_sweep",
           "run_variant", "write_sweep_report", "link_tree"]
