"""``llmagogy contrast`` (the based/cringe detector) and ``llmagogy route`` (the gatekeeper): their
command lines. Light on import (argparse only), so that ``llmagogy``'s quick commands do not load
torch; the work is imported when it runs."""
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


def add_route_command(sub) -> None:
    """``llmagogy route --gatekeeper STAGE_OR_RUN --experts RUN... [--data SOURCE] [--out DIR] ...``."""
    p = sub.add_parser("route", help="the gatekeeper: which expert serves each document (a probe on its hidden "
                       "states, or the experts' loss on a prefix); accuracy, loss and compute on a mixed held-out set")
    p.add_argument("--gatekeeper", required=True, metavar="STAGE_OR_RUN",
                   help="the pre-final model (or it trained further): a run dir, a stage dir, or its weights")
    p.add_argument("--experts", required=True, nargs="+", metavar="RUN",
                   help="the experts (runs branched from the trunk, same tokenizer; a trunk run dir: the experts its "
                        "experts.json lists); each one's own corpus is the data of its stages after the branch point")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="route every document of this source (streamed; any source a stage's data: takes) into "
                        "routes.jsonl")
    p.add_argument("--text-field", default="text", help="the text field of JSON records (default text)")
    p.add_argument("--split", default="all", choices=("all", "train", "heldout"), help="which documents of --data")
    p.add_argument("--general", default=None, metavar="STAGE_OR_RUN",
                   help="a general model to compare with, e.g. the trunk's full-corpus model")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the gatekeeper's run dir/route); "
                   "re-run the same command to resume routing --data and reuse the probe")
    p.add_argument("--method", default="both", choices=("probe", "prefix", "both"), help="the routers (default both)")
    p.add_argument("--probe-tokens", type=int, default=128,
                   help="the probe reads a document's first N tokens (default 128; at most the gatekeeper's seq_len-1)")
    p.add_argument("--probe-docs", type=int, default=200,
                   help="training documents of each expert's own corpus the probe learns from (default 200)")
    p.add_argument("--probe-l2", type=float, default=1e-2, help="the probe's L2 penalty (default 0.01)")
    p.add_argument("--prefix-tokens", type=int, default=32,
                   help="the prefix router scores a document's first N tokens under every expert (default 32)")
    p.add_argument("--eval-docs", type=int, default=200,
                   help="held-out documents of each expert's own corpus in the mixed set (default 200; 0: none)")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass (default 32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.set_defaults(fn=cmd_route)


def cmd_route(args) -> int:
    from llmagogy_ds.config.load import load_source
    from llmagogy_ds.evaluation.route_report import run_route

    src = load_source({"path": args.data, "text_field": args.text_field}, where="--data") if args.data else None
    methods = ("probe", "prefix") if args.method == "both" else (args.method,)
    res = run_route(args.gatekeeper, args.experts, src, args.out, general=args.general, methods=methods,
                    probe_tokens=args.probe_tokens, probe_docs=args.probe_docs, prefix_tokens=args.prefix_tokens,
                    eval_docs=args.eval_docs, l2=args.probe_l2, split=args.split, batch=args.batch, device=args.device)
    if res:  # rank 0
        ev = res["evaluation"]
        if ev:
            best = ev["systems"][ev["best_single_expert"]]["loss"]
            for m, acc in ev["accuracy"].items():
                print(f"[llmagogy] route ({m}): {acc:.1%} right on {sum(ev['documents'].values()):,} held-out "
                      f"documents; loss {ev['systems'][f'routed ({m})']['loss']:.4f} nats/token "
                      f"(best single expert {best:.4f})")
        if res["routes"]:
            print(f"[llmagogy] routed {res['routes']['documents']:,} documents: {res['files']['routes']}")
        print(f"[llmagogy] report: {res['files']['report']}")
    return 0


__all__ = ["add_contrast_command", "cmd_contrast", "add_route_command", "cmd_route"]
