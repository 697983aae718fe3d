"""The command line of ``interop/``: ``llmagogy export`` and ``llmagogy eval --lm-eval``. Light
on import (argparse only) so that ``llmagogy``'s quick commands do not load torch; the work is
imported when a command runs."""
from __future__ import annotations

import sys
from pathlib import Path

from llmagogy_ds.config.schema import EXPORT_DTYPES


def add_export_command(sub) -> None:
    """``llmagogy export RUN_DIR|STAGE_DIR --hf OUT [--dtype fp32|bf16] [--check]``."""
    p = sub.add_parser("export", help="a stage's model as a Hugging Face LLaMA directory (transformers, vLLM, "
                                      "lm-eval load it offline)")
    p.add_argument("path", help="run dir (its last finished stage), a stage dir, or its weights (model/ or model.pt)")
    p.add_argument("--hf", required=True, type=Path, metavar="OUT", help="output directory")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="fp32", help="weights' dtype (default fp32)")
    p.add_argument("--check", action="store_true",
                   help="then load OUT with transformers and compare its logits with ours")
    p.set_defaults(fn=cmd_export)


def cmd_export(args) -> int:
    import torch

    from llmagogy_ds.evaluation.results import load_model
    from llmagogy_ds.interop.export import export_path, logits_difference

    out, s = export_path(args.path, args.hf, args.dtype)
    print(f"[llmagogy] exported stage {s} to {out}")
    if args.check:
        model, tok, _, _ = load_model(args.path, device="cpu")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, tok.get_vocab_size(), (2, min(64, model.seq_len)), generator=gen)
        diff = logits_difference(out, model.float(), ids)
        print(f"[llmagogy] transformers vs ours: max |logit difference| {diff:.3g} ({args.dtype})")
        if args.dtype == "fp32" and diff > 1e-4:
            print("[llmagogy] the exported model differs from ours", file=sys.stderr)
            return 1
    return 0


def add_lm_eval_arguments(p) -> None:
    """``--lm-eval TASKS [--num-fewshot N] [--lm-eval-device DEV]`` on ``llmagogy eval``."""
    p.add_argument("--lm-eval", action="append", default=[], metavar="TASKS",
                   help="lm-evaluation-harness tasks on the exported model: lm-eval names, task YAML files, or "
                        "our multiple-choice JSONL (comma-separated or repeated); results in eval.json")
    p.add_argument("--num-fewshot", type=int, default=None, help="with --lm-eval: shots (default: the task's)")
    p.add_argument("--lm-eval-device", default="cpu", help="with --lm-eval: torch device (default cpu)")


def lm_eval_for(args, res: dict) -> None:
    """``llmagogy eval``'s ``--lm-eval``, after our scores: run it, keep it in ``res`` and in
    ``eval.json``, print its table."""
    if not args.lm_eval:
        return
    from llmagogy_ds.interop.lm_eval import evaluate_path, format_lm_eval

    res["lm_eval"] = evaluate_path(args.path, args.lm_eval, args.num_fewshot, args.lm_eval_device)
    print(format_lm_eval(res["lm_eval"]))


__all__ = ["add_export_command", "cmd_export", "add_lm_eval_arguments", "lm_eval_for"]
