"""Experts side by side, for a trunk run with expert branches (``TRUNK/experts.json``, written by
``llmagogy branch``): ``llmagogy report TRUNK`` puts the table in report.md, ``llmagogy summary
TRUNK`` prints it.

* Rows: the trunk's model at each branch point (its stage k: the general model the experts grew
  from), every expert's final model, and the trunk's final model when the trunk trained further.
* Columns: every expert's held-out set, i.e. the held-out split of its own stages' data (the
  stages after its branch point; several own stages count together, token-weighted), and the
  mean over those columns.
* Cells: held-out loss (nats/token) on the trainer's held-out windows of those stages (up to each
  stage's ``train.eval_tokens``), scored by ``evaluation.exams.heldout_bits_per_byte`` with the
  model's own context length. All models share the trunk's tokenizer. The best row of each
  column is marked.

Each cell is computed once: ``TRUNK/experts/side_by_side.json`` keeps them under the model's
weights fingerprint (``evaluation.results.weights_fingerprint``) and the set's data fingerprint, so a
retrained model or a changed set is scored again and nothing else is.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.fmt import md_table, num, text_table
from llmagogy_ds.evaluation.results import weights_fingerprint
from llmagogy_ds.train.branch import read_experts

SIDE_BY_SIDE = "side_by_side.json"  # in TRUNK/experts/


def cache_path(trunk: Path) -> Path:
    return Path(trunk) / RD.EXPERTS_DIR / SIDE_BY_SIDE


def _model_row(label: str, run_dir: Path, cfg, s: int) -> dict:
    sdir = RD.stage_dir(run_dir, cfg, s)
    return {"model": label, "run_dir": str(run_dir), "stage": cfg.stages[s].name, "stage_dir": str(sdir),
            "fingerprint": weights_fingerprint(sdir)}


def models(trunk: Path) -> list[dict]:
    """The rows (module doc); ``fingerprint`` is None for a model that has not finished."""
    trunk = Path(trunk)
    tcfg = RD.load_run_config(trunk)
    experts = read_experts(trunk)
    points = sorted({tcfg.stage_index(e["from_stage"]) for e in experts.values()})
    rows = [_model_row(f"trunk @ {tcfg.stages[k].name}", trunk, tcfg, k) for k in points]
    for name, e in experts.items():
        d = Path(e["run_dir"])
        if RD.frozen_config_path(d).exists():
            cfg = RD.load_run_config(d)
            rows.append(_model_row(f"expert {name}", d, cfg, len(cfg.stages) - 1))
    last = len(tcfg.stages) - 1
    if points and last > points[-1]:
        rows.append(_model_row(f"trunk @ {tcfg.stages[last].name} (final)", trunk, tcfg, last))
    return rows


def heldout_sets(trunk: Path) -> list[dict]:
    """Every expert's held-out set: its own stages' packed data (``data``: None while the expert
    has not been prepared) and a fingerprint of what is scored."""
    from llmagogy_ds.evaluation.results import stage_cache

    out = []
    for name, e in read_experts(trunk).items():
        d = Path(e["run_dir"])
        lin = RD.read_json(RD.lineage_path(d)) if RD.frozen_config_path(d).exists() else None
        if lin is None:
            out.append({"expert": name, "stages": [], "key": None})
            continue
        cfg = RD.load_run_config(d)
        stages = [(st, stage_cache(d, st.name)) for st in cfg.stages[lin["from_index"] + 1:]]
        ready = all(data is not None for _, data in stages)
        key = hashlib.sha256(json.dumps([[data.root.name, st.train.eval_tokens] for st, data in stages])
                             .encode()).hexdigest()[:16] if ready else None
        out.append({"expert": name, "stages": stages if ready else [], "key": key})
    return out


def _score(model, tok, stages) -> float:
    """Token-weighted held-out loss of ``model`` over the sets of ``stages``."""
    from llmagogy_ds.evaluation.exams import heldout_bits_per_byte

    parts = [heldout_bits_per_byte(model, tok, data, model.seq_len, st.train.eval_tokens) for st, data in stages]
    tokens = sum(p["tokens"] for p in parts)
    return sum(p["loss"] * p["tokens"] for p in parts) / tokens if tokens else float("nan")


def side_by_side(trunk: Path, compute: bool = True, device=None, log=print) -> dict:
    """The table (module doc): ``{"columns", "rows": [{"model", ..., "losses": {expert: loss},
    "mean"}], "best": {column: model}, "missing": cells not computed}``. ``compute``: score the
    cells not in the cache (each model loaded once) and store them; else only what is cached."""
    trunk = Path(trunk)
    rows, sets = models(trunk), heldout_sets(trunk)
    cache_file = cache_path(trunk)
    cache = RD.read_json(cache_file) or {}
    missing = 0
    for row in rows:
        todo = [s for s in sets if s["key"] and row["fingerprint"] and f"{row['fingerprint']}|{s['key']}" not in cache]
        if todo and compute:
            from llmagogy_ds.evaluation.results import load_model

            log(f"[llmagogy] experts side by side: {row['model']} on {len(todo)} held-out set(s)")
            model, tok, _, _ = load_model(Path(row["stage_dir"]), device)
            for s in todo:
                cache[f"{row['fingerprint']}|{s['key']}"] = _score(model, tok, s["stages"])
            RD.write_atomic(cache_file, cache)
            todo = []
        missing += len(todo)
        row["losses"] = {s["expert"]: cache.get(f"{row['fingerprint']}|{s['key']}") for s in sets}
        vals = list(row["losses"].values())
        row["mean"] = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None
    columns = [s["expert"] for s in sets]
    best = {}
    for col in columns + ["mean"]:
        scored = [(r["losses"].get(col) if col != "mean" else r["mean"], r["model"]) for r in rows]
        scored = [(v, m) for v, m in scored if v is not None]
        if scored:
            best[col] = min(scored)[1]
    return {"trunk": str(trunk), "columns": columns, "rows": rows, "best": best, "missing": missing,
            "unprepared": [s["expert"] for s in sets if s["key"] is None]}


def _cells(table: dict, mark) -> tuple[list[str], list[list[str]]]:
    headers = ["model"] + [f"{c} set" for c in table["columns"]] + ["mean"]
    rows = []
    for r in table["rows"]:
        cells = [r["model"] + ("" if r["fingerprint"] else " (not finished)")]
        for col in table["columns"] + ["mean"]:
            v = r["mean"] if col == "mean" else r["losses"].get(col)
            cells.append(mark(num(v)) if v is not None and table["best"].get(col) == r["model"] else num(v))
        rows.append(cells)
    return headers, rows


def _notes(table: dict) -> list[str]:
    out = []
    if table["missing"]:
        trunk = shlex.quote(table["trunk"])
        out.append(f"{table['missing']} cell(s) not computed yet: `llmagogy report {trunk}` (or "
                   f"`llmagogy summary {trunk} --compute`) scores them and keeps them in {SIDE_BY_SIDE}")
    if table["unprepared"]:
        out.append(f"no held-out set yet for {', '.join(table['unprepared'])} (the expert has not been prepared: "
                   "`llmagogy run` or `prepare` it)")
    return out


def markdown(table: dict) -> list[str]:
    """report.md's section."""
    headers, rows = _cells(table, lambda s: f"**{s}**")
    return ["## Experts side by side", "", md_table(headers, rows), "",
            "Held-out loss (nats/token) of each model on each expert's held-out set (the held-out split of the "
            "expert's own stages' data, the trainer's windows) and their mean; bold: the best of each column. "
            "Rows: the trunk at each branch point, each expert's final model, the trunk's final model.", "",
            *[f"- {n}" for n in _notes(table)], ""]


def text(table: dict) -> str:
    """``llmagogy summary``'s table."""
    headers, rows = _cells(table, lambda s: f"{s} *")
    return "\n".join([text_table(f"experts side by side (held-out loss, * best of its column): {table['trunk']}",
                                 headers, rows), *_notes(table)])


__all__ = ["side_by_side", "models", "heldout_sets", "markdown", "text", "cache_path", "SIDE_BY_SIDE"]
