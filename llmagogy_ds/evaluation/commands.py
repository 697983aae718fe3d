"""``llmagogy contrast``: the based/cringe detector's command line. Light on import (argparse only),
so that ``llmagogy``'s quick commands do not load torch; the work is imported when it runs."""
from __future__ import annotations

from pathlib import Path


def add_contrast_command(sub) -> None:
    """``llmagogy contrast BASE FULL --data SOURCE [--out DIR] [--flag-above X] [--top K] ...``."""
    p = sub.add_parser("contrast", help="the based/cringe detector: every document of a source scored under BASE "
                       "(the pre-final model) and FULL; ranked JSONL, report, histogram, flagged/kept files")
    p.add_argument("base", help="BASE: a run dir (its last finished stage), a stage dir, or its weights")
    p.add_argument("full", help="FULL: the same forms (same tokenizer), e.g. the full-corpus stage")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="what a stage's data: takes: a .txt/.jsonl/.json/.parquet file or directory, a hub dataset, "
                        "synthetic:levelN (read as a stream)")
    p.add_argument("--text-field", default="text", help="the text field of JSON records (default text)")
    p.add_argument("--split", default="all", choices=("all", "train", "heldout"),
                   help="which documents of the source (held-out: its heldout file, or every 20th document)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: FULL's run dir/contrast); "
                   "re-run the same command to resume")
    p.add_argument("--score", default="gain", choices=("gain", "gain_sqrt"),
                   help="ranking: mean gain per token (default), or summed gain / sqrt(tokens) (length-aware)")
    p.add_argument("--flag-above", type=float, default=None, metavar="X",
                   help="flag the documents scoring above X: flagged.jsonl, the others kept.jsonl")
    p.add_argument("--top", type=int, default=None, metavar="K", help="flag the K highest-scoring documents")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass (default 32)")
    p.add_argument("--report-docs", type=int, default=20, help="top documents shown in the report (default 20)")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.set_defaults(fn=cmd_contrast)


def cmd_contrast(args) -> int:
    from llmagogy_ds.config.load import load_source
    from llmagogy_ds.evaluation.contrast_report import run_contrast

    spec = {"path": args.data, "text_field": args.text_field}
    res = run_contrast(args.base, args.full, load_source(spec, where="--data"), args.out, split=args.split,
                       by=args.score, flag_above=args.flag_above, top=args.top, batch=args.batch,
                       report_docs=args.report_docs, device=args.device)
    if res:  # rank 0
        q = res["quantiles"]
        print(f"[llmagogy] contrast {res['models']['full']['stage']} over {res['models']['base']['stage']}: "
              f"{res['documents']:,} documents, {args.score} median {q['0.5']:+.4f}, 99% {q['0.99']:+.4f}")
        if res["flagged"] is not None:
            print(f"[llmagogy] flagged {res['flagged']:,}: {res['files']['flagged']}; kept: {res['files']['kept']}")
        print(f"[llmagogy] scores: {res['files']['scores']}\n[llmagogy] report: {res['files']['report']}")
    return 0


__all__ = ["add_contrast_command", "cmd_contrast"]
