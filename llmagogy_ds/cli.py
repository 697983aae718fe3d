"""``llmagogy`` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

from llmagogy_ds.config import ConfigError, load_config
from llmagogy_ds.evaluation.commands import add_contrast_command, add_route_command
from llmagogy_ds.fmt import num
from llmagogy_ds.interop.commands import add_export_command, add_lm_eval_arguments, lm_eval_for


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="curriculum YAML (e.g. configs/tiny.yaml)")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<run.name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. stages.primary.train.lr=1e-3 (repeatable)")


def load_run_config_arg(args):
    """The config of ``args.config``: a YAML file, or a run directory (its frozen config.yaml;
    the run dir defaults to it: ``llmagogy run EXPERT_DIR``)."""
    from llmagogy_ds import rundir as RD

    path = Path(args.config)
    if path.is_dir() and RD.frozen_config_path(path).exists():
        args.run_dir = args.run_dir or path
        path = RD.frozen_config_path(path)
    return load_config(path, args.overrides)


def prepare_run(args):
    """Open the run dir (a different frozen config is refused) and prepare tokenizer + data:
    the first half of ``run``, and what a SLURM job does once on its batch host."""
    from llmagogy_ds import rundir as RD
    from llmagogy_ds.data import prepare as DP
    from llmagogy_ds.interop.import_hf import prepare_hf
    from llmagogy_ds.train.branch import ensure_branch

    cfg = load_run_config_arg(args)
    run_dir = args.run_dir or Path("runs") / cfg.run.name
    names = [s.name for s in cfg.stages]
    if args.stage and args.stage not in names:
        raise ConfigError(f"--stage: no stage named {args.stage!r} (stages: {', '.join(names)})")
    RD.open_run_dir(cfg, run_dir, restart=args.restart, until_prepared=True)
    ensure_branch(run_dir)  # an expert branch: the trunk's stages and tokenizer linked, its lineage checked
    prepare_hf(cfg, run_dir)  # init.hf checked and its tokenizer made the run's; export: its dependencies
    # every input error surfaces here, before any training
    workers = getattr(args, "workers", None)  # prepare --workers; else every CPU available
    DP.prepare_data(cfg, run_dir, **({"workers": workers} if workers else {}))
    RD.mark_prepared(run_dir)  # until here, a fixed config may replace the frozen one (no --restart)
    return cfg, run_dir


def cmd_tokenize(args) -> int:
    """Tokenize the curriculum's sources into the data cache (a CPU job of its own on a cluster)."""
    from llmagogy_ds import rundir as RD
    from llmagogy_ds.data import prepare as DP
    from llmagogy_ds.train.branch import link_tokenizer

    cfg = load_run_config_arg(args)
    names = [s.name for s in cfg.stages]
    if args.stage and args.stage not in names:
        raise ConfigError(f"--stage: no stage named {args.stage!r} (stages: {', '.join(names)})")
    part = None
    if args.partition:
        try:
            i, n = (int(x) for x in args.partition.split("/"))
        except ValueError:
            i, n = -1, 0
        if not 1 <= i <= n:
            raise ConfigError(f"--partition: expected I/N with 1 <= I <= N, got {args.partition!r}")
        part = (i - 1, n)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    run_dir = args.run_dir or Path("runs") / cfg.run.name
    with contextlib.redirect_stdout(sys.stderr):
        RD.open_run_dir(cfg, run_dir, restart=args.restart, until_prepared=True)
        link_tokenizer(run_dir)  # an expert branch tokenizes with the trunk's tokenizer
        done = DP.tokenize_sources(cfg, run_dir, args.stage, args.workers, part)
    for path, meta in done:
        if meta is None:
            print(f"{path}: partition {args.partition} done; the last partition to finish merges them")
        else:
            c = meta["counts"]
            print(f"{path}: {c['train']['tokens']:,} train + {c['heldout']['tokens']:,} held-out tokens "
                  f"({meta['train'].get('prefix') or meta['train'].get('file')})")
    return 0


def cmd_prepare(args) -> int:
    # stdout is the run dir alone, for scripts (RUN=$(llmagogy prepare ...)); messages go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        _, run_dir = prepare_run(args)
    print(run_dir)
    return 0


def cmd_run(args) -> int:
    from llmagogy_ds import rundir as RD
    from llmagogy_ds.cluster.launcher import run_stage

    if getattr(args, "baseline", False):
        if args.stage:
            raise ConfigError("--stage: a baseline has one stage of its own; leave out --stage with --baseline")
        return cmd_baseline(args)
    cfg, run_dir = prepare_run(args)
    names = [s.name for s in cfg.stages]
    todo = [args.stage] if args.stage else names
    for name in todo:
        s = cfg.stage_index(name)
        if RD.stage_result(run_dir, cfg, s) is not None:
            print(f"[llmagogy] stage {name}: done")
            continue
        nproc = cfg.stages[s].train.nproc
        print(f"[llmagogy] stage {s} {name}: {nproc} process(es)", flush=True)
        rc = run_stage(run_dir, name, nproc, ["--stop-after", str(args.stop_after)] if args.stop_after else [])
        if rc != 0:
            print(f"[llmagogy] stage {name} failed (exit {rc}); re-run the same command to resume", file=sys.stderr)
            return rc
        if RD.stage_result(run_dir, cfg, s) is None:
            print(f"[llmagogy] stage {name} stopped before its end; re-run the same command to resume")
            return 0
    summary = RD.write_summary(cfg, run_dir)
    print_summary(summary)
    print(f"[llmagogy] summary: {run_dir / 'summary.json'}")
    return 0


def cmd_baseline(args) -> int:
    """The final architecture from scratch on every stage's corpora, at >= the curriculum's FLOPs."""
    from llmagogy_ds.evidence import baseline as B
    from llmagogy_ds import rundir as RD
    from llmagogy_ds.cluster import launcher

    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / f"{cfg.run.name}-baseline"
    derived, info = B.prepare_baseline(cfg, run_dir, args.curriculum, restart=args.restart)
    print_baseline_plan(info, run_dir)
    stage = derived.stages[0]
    if RD.stage_result(run_dir, derived, 0) is not None:
        print(f"[llmagogy] baseline {run_dir}: done")
    elif getattr(args, "prepare_only", False):
        q = shlex.quote
        print(f"[llmagogy] baseline prepared in {run_dir}; train it with "
              f"`llmagogy run {q(str(run_dir / 'config.yaml'))} --run-dir {q(str(run_dir))}` "
              "(or `llmagogy submit` the same)")
        return 0
    else:
        print(f"[llmagogy] baseline {stage.name}: {stage.train.nproc} process(es)", flush=True)
        extra = ["--stop-after", str(args.stop_after)] if getattr(args, "stop_after", None) else []
        rc = launcher.run_stage(run_dir, stage.name, stage.train.nproc, extra)
        if rc != 0:
            print(f"[llmagogy] baseline failed (exit {rc}); re-run the same command to resume", file=sys.stderr)
            return rc
        if RD.stage_result(run_dir, derived, 0) is None:
            print("[llmagogy] baseline stopped before its end; re-run the same command to resume")
            return 0
    summary = RD.write_summary(derived, run_dir)
    print_summary(summary)
    if args.curriculum:
        print_comparison(Path(args.curriculum), run_dir)
    print(f"[llmagogy] report: llmagogy report {args.curriculum or 'CURRICULUM_RUN'} --baseline {run_dir}")
    return 0


def print_baseline_plan(info: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"baseline {run_dir}: the final architecture from scratch")
    t.add_column("")
    t.add_column("value")
    src = info.get("curriculum_run") or "its config"
    t.add_row("curriculum FLOPs", f"{info['curriculum_flops']:.4g} (from {src})")
    for st in info["stages"]:
        t.add_row(f"  stage {st['name']}", f"{st['tokens']:,} tokens, {st['flops']:.4g} FLOPs")
    t.add_row("baseline FLOPs", f"{info['baseline_flops']:.4g} "
              f"({info['baseline_flops'] / info['curriculum_flops']:.3f} x the curriculum's)")
    t.add_row("baseline tokens", f"{info['baseline_tokens']:,} ({info['baseline_steps']:,} steps)")
    for d in info["data"]:
        t.add_row(f"  corpus {d['path']}", f"weight {d['weight']:.4g}")
    Console(width=150).print(t)


def print_comparison(curriculum_run: Path, baseline_run: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmagogy_ds.evidence import report as R

    cur = R.load_curriculum(curriculum_run)
    base = R.load_baseline(baseline_run, cur)
    cmp = R.comparison(cur, base)
    t = Table(title="held-out loss, same held-out windows")
    for col in ("held-out set", "curriculum (end of its stage)", "baseline (final)"):
        t.add_column(col)
    for st in cur.stages:
        t.add_row(st.name, num((st.result or {}).get("loss_end")), num(base.final_loss(st.name)))
    Console(width=150).print(t)
    if cmp["target"] is None:
        print("[llmagogy] FLOPs-to-target ratio: the curriculum has not finished")
    elif cmp["reached"]:
        print(f"[llmagogy] FLOPs-to-target ratio: {cmp['ratio']:.3f} (the baseline reaches the curriculum's final "
              f"held-out loss {cmp['target']:.4f} on the {cmp['set']} set at {cmp['flops_to_target']:.4g} FLOPs; "
              f"the curriculum used {cmp['curriculum_flops']:.4g})")
    else:
        print(f"[llmagogy] FLOPs-to-target ratio: not reached (the baseline's best on the {cmp['set']} set is "
              f"{num(cmp['baseline_best'])} > {cmp['target']:.4f} after {cmp['baseline_flops']:.4g} FLOPs)")


def cmd_report(args) -> int:
    from llmagogy_ds.evidence.report import write_report

    res = write_report(Path(args.run_dir), args.baseline, args.out)
    print(f"[llmagogy] report: {res['report']}")
    for p in res["plots"].values():
        print(f"[llmagogy] plot: {p}")
    return 0


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"curriculum {summary['run']}")
    for col in ("stage", "params", "tokens", "GFLOPs", "loss prev", "after growth", "loss end", "exam", "drift (gen: rel)"):
        t.add_column(col)

    f = num
    for s in summary["stages"]:
        if s.get("status") != "done":
            t.add_row(s["name"], *(["pending"] + [""] * 8))
            continue
        drift = " ".join(f"{g['generation']}:{g['drift']:.3f}" for g in s["generations"][:-1])
        t.add_row(s["name"], f"{s['n_params']:,}", f"{s['tokens']:,}", f(s["flops"] / 1e9, "{:.1f}"),
                  f(s["loss_prev_model"]), f(s["loss_after_growth"]), f(s["loss_end"]),
                  f(s["exam_accuracy"], "{:.1%}"), drift or "-")
    Console(width=150).print(t)


def cmd_train_stage(args) -> int:
    from llmagogy_ds.train.loop import main

    return main(["--run-dir", str(args.run_dir), "--stage", args.stage]
                + (["--stop-after", str(args.stop_after)] if args.stop_after else []))


def cmd_sweep(args) -> int:
    from llmagogy_ds.cluster.launcher import run_stage
    from llmagogy_ds.evidence import sweep as SW

    sweep = SW.load_sweep(args.sweep, args.out)  # every variant's config checked before any compute
    out = SW.write_sweep_report(sweep) if args.report_only else SW.run_sweep(sweep, run_stage, args.only)
    print(f"[llmagogy] sweep: {out['table']}" + (f", {out['figure']}" if out["figure"] else ""))
    return 0


def cmd_validate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(f"{args.config}: OK ({len(cfg.stages)} stages)")
    return 0


def cmd_summary(args) -> int:
    from llmagogy_ds import rundir as RD
    from llmagogy_ds.train.branch import read_experts

    print_summary(RD.read_summary(Path(args.run_dir)))
    if read_experts(Path(args.run_dir)):  # a trunk: its models and experts on every expert's held-out set
        from llmagogy_ds.evidence import experts as EX

        print(EX.text(EX.side_by_side(Path(args.run_dir), compute=args.compute)))
    return 0


def cmd_branch(args) -> int:
    from llmagogy_ds.train.branch import branch

    # stdout is the expert run dirs alone, one a line, for scripts; messages go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        dirs = branch(args.run_dir, args.from_stage, args.experts, args.out)
        print(f"[llmagogy] train an expert with `llmagogy run EXPERT_DIR`; every expert after the trunk's stage "
              f"{args.from_stage} with `llmagogy submit {shlex.quote(str(args.run_dir))}`")
    print("\n".join(map(str, dirs)))
    return 0


def cmd_submit(args) -> int:
    from llmagogy_ds.cluster.experts import submit_run  # a trunk's experts after it, or one expert

    cfg = load_run_config_arg(args)
    if args.tokenize_parts < 1 or args.tokenize_cpus < 1:
        raise ConfigError("--tokenize-parts and --tokenize-cpus must be >= 1")
    submit_run(cfg, args.run_dir or Path("runs") / cfg.run.name, dry_run=args.dry_run,
           tokenize={"parts": args.tokenize_parts, "cpus": args.tokenize_cpus, "time_limit": args.tokenize_time})
    return 0


def cmd_status(args) -> int:
    from llmagogy_ds.cluster.slurm import print_status
    from llmagogy_ds.train.branch import expert_dirs

    print_status(Path(args.run_dir))
    for d in expert_dirs(Path(args.run_dir)):  # a trunk's expert branches follow it
        print_status(d)
    return 0


def cmd_eval(args) -> int:
    from llmagogy_ds.evaluation.results import evaluate_run, format_table

    res = evaluate_run(args.path, exams=args.exam, pairs=args.pairs, texts=args.text)
    print(format_table(res))
    lm_eval_for(args, res)  # --lm-eval: lm-evaluation-harness on the exported model, also into eval.json
    print(f"[llmagogy] results: {res.get('output')}")
    return 0


def cmd_plan(args) -> int:
    from llmagogy_ds import rundir as RD
    from llmagogy_ds.cluster.plan import format_plan, plan_curriculum

    cfg = load_config(args.config, args.overrides, check_files=not args.no_check_files)
    if args.json:
        RD.check_writable(Path(args.json))  # before planning, not after printing the plan
    plans = plan_curriculum(cfg, gpu=args.gpu, mfu=args.mfu)
    print(format_plan(plans))
    if args.json:
        RD.write_atomic(Path(args.json), json.dumps([p.to_dict() for p in plans], indent=1, default=str) + "\n")
    return 0 if all(p.fits for p in plans) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="llmagogy", description="curriculum pre-training of growing LLMs")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also LLMAGOGY_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="train the curriculum (or one stage); re-run to resume")
    _common(p)
    p.add_argument("--stage", help="run only this stage")
    p.add_argument("--restart", action="store_true",
                   help="the run dir holds another config: move it aside (RUN.old-DATE) and start over")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true",
                   help="train the from-scratch baseline instead (as `llmagogy baseline`; --run-dir is the baseline's)")
    p.add_argument("--curriculum", type=Path, default=None, help="with --baseline: the finished curriculum run")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("baseline", help="the final stage's architecture from scratch on every stage's corpora, "
                       "with at least the curriculum's FLOPs (run dir default: runs/<run.name>-baseline)")
    _common(p)
    p.add_argument("--curriculum", type=Path, default=None,
                   help="the finished curriculum run: its tokenizer and its measured FLOPs (default: counted from "
                        "the config, tokenizer trained from it)")
    p.add_argument("--restart", action="store_true", help="the run dir holds another baseline: move it aside")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the run dir (tokenizer, data, derived config.yaml) and train nothing "
                        "(then `run` or `submit` its config.yaml)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_baseline)
    p = sub.add_parser("report", help="report.md and plots: loss vs FLOPs, curriculum vs baseline, exams, drift")
    p.add_argument("run_dir", help="the curriculum's run directory")
    p.add_argument("--baseline", type=Path, default=None, help="the baseline's run directory (llmagogy baseline)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/report)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("prepare", help="open the run dir and prepare tokenizer + data; print the run dir")
    _common(p)
    p.add_argument("--stage", help="check that this stage exists")
    p.add_argument("--restart", action="store_true", help="as for run")
    p.add_argument("--workers", type=int, default=None, help="tokenization processes (default: the CPUs available)")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("tokenize", help="tokenize the sources into the data cache (shared by stages and runs), "
                       "with a progress bar")
    _common(p)
    p.add_argument("--stage", help="only this stage's sources")
    p.add_argument("--workers", type=int, default=None, help="tokenization processes (default: the CPUs available)")
    p.add_argument("--partition", default=None, metavar="I/N",
                   help="only the I-th of N parts of each source (a SLURM array task); the last to finish merges")
    p.add_argument("--restart", action="store_true", help="as for run")
    p.set_defaults(fn=cmd_tokenize)
    p = sub.add_parser("submit", help="SLURM: one sbatch job per remaining stage (slurm/stage.sh), chained; a "
                       "trunk's experts after it (CONFIG may be a run dir)")
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p.add_argument("--tokenize-parts", type=int, default=1, metavar="N",
                   help="array tasks of the tokenization job that comes first when a text source is not in the "
                        "data cache yet (each a 1/N part of every source, merged by the last)")
    p.add_argument("--tokenize-cpus", type=int, default=16, metavar="C", help="CPUs of each tokenization task")
    p.add_argument("--tokenize-time", default="24:00:00", metavar="T", help="time limit of each tokenization task")
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("status", help="stages of a run: done/running/pending, step, loss, SLURM job")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("validate", help="check a config and exit")
    _common(p)
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("train-stage", help="one rank of a stage (what torchrun/srun start)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--stop-after", type=int, default=None)
    p.set_defaults(fn=cmd_train_stage)
    p = sub.add_parser("summary", help="print a run's summary.json (a trunk: its experts side by side)")
    p.add_argument("run_dir")
    p.add_argument("--compute", action="store_true",
                   help="a trunk with experts: score the side-by-side cells not computed yet (`report` does too)")
    p.set_defaults(fn=cmd_summary)
    p = sub.add_parser("branch", help="expert curricula continuing RUN from one of its stages, each in its own "
                       "run dir (hard links to the trunk's stages, its tokenizer and data cache)")
    p.add_argument("run_dir", type=Path, help="the trunk's run directory")
    p.add_argument("--from", dest="from_stage", required=True, metavar="STAGE", help="the trunk stage they grow from")
    p.add_argument("--experts", type=Path, required=True, metavar="EXPERTS.yaml",
                   help="the experts: name, description, stages (README: Expert branches)")
    p.add_argument("--out", type=Path, default=None, help="where the expert run dirs go (default: RUN/experts)")
    p.set_defaults(fn=cmd_branch)
    add_export_command(sub)
    add_contrast_command(sub)
    add_route_command(sub)
    p = sub.add_parser("eval", help="held-out loss / bits per byte, multiple-choice exams, minimal pairs")
    p.add_argument("path", help="run dir (last finished stage), a stage dir, or its weights (model/ or model.pt)")
    p.add_argument("--exam", action="append", default=[], metavar="JSONL",
                   help='multiple choice: {"question", "choices", "answer", "grade"?, "subject"?} (file or dir)')
    p.add_argument("--pairs", action="append", default=[], metavar="JSONL",
                   help="minimal pairs, BLiMP format: sentence_good, sentence_bad, UID/linguistics_term (file or dir)")
    p.add_argument("--text", action="append", default=[], metavar="FILE", help="a text file: loss and bits per byte")
    add_lm_eval_arguments(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("plan", help="per stage: parameters, tokens, FLOPs, memory per GPU, time; flags what won't fit")
    _common(p)
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, a100-40, l40s, cpu (default h100)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.add_argument("--no-check-files", action="store_true", help="plan a config whose data is not on this machine")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("size-search", help="train a ladder of (layers, hidden) briefly on a stage's corpus; "
                       "recommend the smallest that does not memorize it")
    _common(p)
    from llmagogy_ds.evidence.size_search import add_arguments as _size_search_args, cmd_size_search

    _size_search_args(p)
    p.set_defaults(fn=cmd_size_search)
    p = sub.add_parser("sweep", help="curriculum variants (growth operator, F, budgets, schedule), shared stages "
                       "trained once; one table and one figure")
    p.add_argument("sweep", type=Path, help="sweep YAML (e.g. configs/graded-sweep.yaml)")
    p.add_argument("--out", type=Path, default=None, help="sweep directory (default: the file's out, else runs/NAME)")
    p.add_argument("--only", action="append", default=None, metavar="VARIANT", help="run only this variant (repeatable)")
    p.add_argument("--report-only", action="store_true", help="write the table and figure from what has run")
    p.set_defaults(fn=cmd_sweep)
    for p in sub.choices.values():  # `llmagogy run CONFIG --debug` as well as `llmagogy --debug run CONFIG`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (also LLMAGOGY_DEBUG=1)")
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        # the errors a user can cause (config, data, run dir, files): one message naming the file
        # or key; a traceback only on request
        if args.debug or os.environ.get("LLMAGOGY_DEBUG"):
            traceback.print_exc()
        print(f"llmagogy: {type(e).__name__}: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmagogy: interrupted", file=sys.stderr)
        return 130


def error_message(e: BaseException) -> str:
    """The message of an error; an OSError as ``PATH: reason`` (its own str puts the errno first)."""
    if isinstance(e, OSError) and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{where}: {e.strerror or e}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
