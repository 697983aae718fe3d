"""What ``llmagogy contrast`` leaves after scoring (rank 0): the ranked ``scores.jsonl``, the
flagged and kept documents, the histogram of scores (PNG) and a self-contained HTML report of
the top (and bottom) documents with their highest-contrast span and tokens highlighted."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from llmagogy_ds import rundir as RD
from llmagogy_ds.config.schema import DataSource
from llmagogy_ds.evaluation.contrast import (FLAGGED, KEPT, META, RANKED, SCORES, ContrastError, flagged_indices,
                                             ranked, read_parts, score_source, stream_documents)

REPORT, HISTOGRAM = "report.html", "histogram.png"
BOTTOM_DOCS = 5  # the documents FULL likes least against BASE, shown under the top ones
EXCERPT = 700  # characters shown either side of a long document's span


def run_contrast(base, full, src: DataSource, out: Path | None = None, *, split: str = "all", by: str = "gain",
                 flag_above: float | None = None, top: int | None = None, batch: int = 32, report_docs: int = 20,
                 device=None, progress: bool = True) -> dict:
    """``llmagogy contrast``: score ``src`` under BASE and FULL (``contrast.score_source``: resumable,
    one part per rank), then on rank 0 rank, write the flagged/kept files, the histogram and the
    report. Returns ``contrast.json``'s content (on rank 0; {} on the others)."""
    if by not in SCORES:
        raise ContrastError(f"--score: expected one of {', '.join(SCORES)}, got {by!r}")
    if top is not None and top < 0 or report_docs < 0:
        raise ContrastError(f"--top and --report-docs must be >= 0, got {top} and {report_docs}")
    run = score_source(base, full, src, out, split=split, batch=batch, device=device, progress=progress)
    if run["rank"] != 0:
        return {}
    return finish(run["out"], run["identity"], run["models"], src, split, run["seed"], by, flag_above, top,
                  report_docs)


def finish(out: Path, ident: dict, models: dict, src, split: str, seed: int, by: str, flag_above, top,
           report_docs: int) -> dict:
    """Rank, write the flagged/kept files, the histogram and the report; ``contrast.json``."""
    rows = ranked(read_parts(out).values(), by)
    if not rows:
        raise ContrastError(f"--data {src.path}: no documents (split {split})")
    RD.write_atomic(out / RANKED, "".join(json.dumps(r) + "\n" for r in rows))
    flagged = flagged_indices(rows, by, flag_above, top)
    shown = {r["index"]: r for r in rows[:report_docs]}
    low = {r["index"]: r for r in rows[max(report_docs, len(rows) - BOTTOM_DOCS):]}
    texts = _second_pass(out, rows, src, seed, split, by, flagged, {*shown, *low},
                         write=flag_above is not None or top is not None)
    scores = np.array([r[by] for r in rows])
    hist = histogram(out / HISTOGRAM, scores, by, flag_above)
    meta = {"identity": ident, "status": "done", "models": models, "score": by, "split": split,
            "documents": len(rows), "tokens": int(sum(r["tokens"] for r in rows)),
            "quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.01", "0.1", "0.5", "0.9", "0.99")},
            "mean": float(scores.mean()), "flag_above": flag_above, "top": top,
            "flagged": len(flagged) if flag_above is not None or top is not None else None,
            "files": {"scores": str(out / RANKED), "report": str(out / REPORT), "histogram": str(hist)}}
    if meta["flagged"] is not None:
        meta["files"].update(flagged=str(out / FLAGGED), kept=str(out / KEPT))
    RD.write_atomic(out / REPORT, report_html(meta, [(shown[i], texts[i]) for i in shown],
                                              [(low[i], texts[i]) for i in low if i not in shown], hist))
    RD.write_atomic(out / META, meta)
    return meta


def _second_pass(out: Path, rows: list[dict], src, seed: int, split: str, by: str, flagged: set[int],
                 wanted: set[int], write: bool) -> dict[int, str]:
    """Read the source once more: the texts the report shows, and (``write``) every document into
    ``flagged.jsonl`` or ``kept.jsonl`` as ``{"text", "contrast"}`` (temporary files, renamed at
    the end, so a killed run never leaves half a file under the final name)."""
    score = {r["index"]: r[by] for r in rows}
    texts: dict[int, str] = {}
    tmp = {name: out / f"{name}.tmp" for name in (FLAGGED, KEPT)}
    files = {name: open(p, "w", encoding="utf-8") for name, p in tmp.items()} if write else {}
    n = 0
    try:
        for i, text in stream_documents(src, seed, split):
            n += 1
            if i not in score:
                raise ContrastError(f"{src.path}: document {i} was not scored: the source changed since it was "
                                    "scored; use another --out")
            if i in wanted:
                texts[i] = text
            if files:
                files[FLAGGED if i in flagged else KEPT].write(json.dumps({"text": text, "contrast": score[i]}) + "\n")
        if n != len(score):
            raise ContrastError(f"{src.path}: {n} documents now, {len(score)} scored: the source changed; "
                                "use another --out")
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    finally:
        for f in files.values():
            f.close()
    for name, p in tmp.items():
        if write:
            p.replace(out / name)
        else:  # without --flag-above/--top, an earlier run's files would mislead
            (out / name).unlink(missing_ok=True)
    return texts


def histogram(path: Path, scores: np.ndarray, by: str, flag_above) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.hist(scores, bins=min(80, max(10, len(scores) // 10)), color="#4c72b0")
    ax.set_yscale("log")
    if flag_above is not None:
        ax.axvline(flag_above, color="#c44e52", linestyle="--", label=f"--flag-above {flag_above:g}")
        ax.legend()
    ax.axvline(0.0, color="0.4", linewidth=0.8)
    ax.set_xlabel(f"{by} (nats{'/token' if by == 'gain' else ' / sqrt(tokens)'}: FULL over BASE)")
    ax.set_ylabel("documents")
    fig.tight_layout()
    try:
        RD.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- the HTML page
_CSS = """body{font-family:system-ui,sans-serif;max-width:70em;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.doc{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em;background:#fafafa;padding:.4em}
mark{background:#ffd54f}b.tok{background:#ef9a9a;font-weight:normal;outline:1px solid #c62828}
.num{font-variant-numeric:tabular-nums;white-space:nowrap}"""


def highlighted(text: str, rec: dict) -> str:
    """The document (an excerpt around the span when long) as HTML: the span in ``<mark>``, the
    top tokens in ``<b class=tok>`` with their gain as a tooltip."""
    span = rec.get("span") or {"start": 0, "end": 0}
    lo, hi = 0, len(text)
    if len(text) > 2 * EXCERPT + (span["end"] - span["start"]):
        lo, hi = max(0, span["start"] - EXCERPT), min(len(text), span["end"] + EXCERPT)
    toks = {t["start"]: t for t in rec.get("top_tokens", []) if lo <= t["start"] and t["end"] <= hi}
    cuts = sorted({lo, hi, *(c for c in (span["start"], span["end"]) if lo <= c <= hi),
                   *(c for t in toks.values() for c in (t["start"], t["end"]))})
    parts = ["… " if lo > 0 else ""]
    for a, b in zip(cuts, cuts[1:]):
        piece = html.escape(text[a:b])
        if a in toks and toks[a]["end"] == b:
            piece = f'<b class="tok" title="gain {toks[a]["gain"]:+.2f} nats">{piece}</b>'
        if span["start"] <= a and b <= span["end"] and span["end"] > span["start"]:
            piece = f"<mark>{piece}</mark>"
        parts.append(piece)
    parts.append(" …" if hi < len(text) else "")
    return "".join(parts)


def _doc_rows(docs: list[tuple[dict, str]], by: str) -> str:
    rows = []
    for rec, text in docs:
        span = rec.get("span") or {}
        rows.append(f'<tr><td class="num">{rec["rank"]}</td><td class="num">{rec[by]:+.4f}</td>'
                    f'<td class="num">{rec["tokens"]}</td><td class="num">{span.get("gain", 0):+.2f}</td>'
                    f'<td><div class="doc">{highlighted(text, rec)}</div></td></tr>')
    head = (f"<tr><th>rank</th><th>{by}</th><th>tokens</th><th>span gain</th>"
            "<th>document (<mark>span</mark>, <b class=tok>top tokens</b>)</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def report_html(meta: dict, top: list[tuple[dict, str]], bottom: list[tuple[dict, str]], hist: Path) -> str:
    """A page with no outside reference (the histogram inlined as a data URI)."""
    by = meta["score"]
    m = meta["models"]
    png = base64.b64encode(Path(hist).read_bytes()).decode("ascii")
    q = meta["quantiles"]
    flagged = ("" if meta["flagged"] is None else
               f"<li>flagged: {meta['flagged']} of {meta['documents']} documents "
               f"(--flag-above {meta['flag_above']}, --top {meta['top']}): {html.escape(meta['files']['flagged'])}; "
               f"the rest: {html.escape(meta['files']['kept'])}</li>")
    define = ("mean log-likelihood gain of FULL over BASE per token (nats)" if by == "gain" else
              "summed log-likelihood gain of FULL over BASE / sqrt(tokens) (length-aware)")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>contrast: {html.escape(m['full']['stage'])}
 over {html.escape(m['base']['stage'])}</title><style>{_CSS}</style></head><body>
<h1>Contrast: what FULL learned that BASE did not</h1>
<ul><li>BASE: stage <b>{html.escape(m['base']['stage'])}</b> ({html.escape(m['base']['checkpoint'])})</li>
<li>FULL: stage <b>{html.escape(m['full']['stage'])}</b> ({html.escape(m['full']['checkpoint'])})</li>
<li>source: {html.escape(str(meta['identity']['source']))} (split {meta['split']}): {meta['documents']:,} documents,
{meta['tokens']:,} tokens, windows of {meta['identity']['seq_len']} tokens</li>
<li>score <b>{by}</b>: {define}; high = FULL finds the document much likelier than BASE does</li>
<li>mean {meta['mean']:+.4f}; quantiles 1% {q['0.01']:+.4f}, 10% {q['0.1']:+.4f}, 50% {q['0.5']:+.4f},
90% {q['0.9']:+.4f}, 99% {q['0.99']:+.4f}</li>{flagged}</ul>
<img alt="histogram of {by}" src="data:image/png;base64,{png}">
<h2>Top {len(top)} documents</h2>{_doc_rows(top, by)}
<h2>Bottom {len(bottom)} documents (FULL likes them least against BASE)</h2>{_doc_rows(bottom, by)}
</body></html>
"""


__all__ = ["run_contrast", "finish", "histogram", "highlighted", "report_html", "REPORT", "HISTOGRAM"]
