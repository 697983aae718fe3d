"""SLURM: ``llmagogy submit`` (one job per stage, chained) and
``llmagogy status`` (the ranks of an srun task find each other in ``parallel/rendezvous.py``).

The job script itself is ``slurm/stage.sh`` (signals, requeue, restarts). It asks this module two
things: which stages are left (``python -m llmagogy_ds.cluster.slurm todo RUN_DIR``) and to note which job
runs a stage (``... note RUN_DIR STAGE JOB_ID``), for ``llmagogy status``.

Run directory additions::

    RUN/slurm_jobs.json             every job submitted for / started on this run: stage, job id, command
    RUN/slurm/<stage>-<jobid>.log   job logs (``llmagogy submit``)
    RUN/slurm/job-<jobid>.failures  how many times that job requeued itself after a failed step

Nothing here imports torch: the trainer imports it early, and the CLI must stay quick.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.fmt import num

# SIGUSR1 arrives this long before the time limit (``--signal=B:USR1@300`` in stage.sh): the ranks
# finish the step and checkpoint in that window. Keep the two in sync.
SIGNAL_GRACE_S = 300
STAGE_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "stage.sh"
TOKENIZE_SCRIPT = STAGE_SCRIPT.parent / "tokenize.sh"  # the CPU job that tokenizes before the stages
JOBS_FILE = RD.JOBS


# --------------------------------------------------------------------------- run-dir bookkeeping
def read_jobs(run_dir: Path) -> list[dict]:
    return RD.read_json(Path(run_dir) / JOBS_FILE) or []  # a torn file is named, not a bare JSONDecodeError


def record_jobs(run_dir: Path, records: list[dict]) -> None:
    """Append to ``RUN/slurm_jobs.json`` (atomic replace: status may read it at any time)."""
    path = Path(run_dir) / JOBS_FILE
    jobs = read_jobs(run_dir) + records
    RD.write_atomic(path, jobs)


def stage_jobs(run_dir: Path) -> dict[str, str]:
    """The job that runs (or last ran) each stage."""
    return {r["stage"]: str(r["job_id"]) for r in read_jobs(run_dir)}


def remaining_stages(run_dir: Path, stage: str | None = None) -> list[tuple[str, int]]:
    """(name, train.nproc) of the stages without ``result.json``, in curriculum order."""
    from llmagogy_ds import rundir as RD

    cfg = RD.load_run_config(run_dir)
    names = [s.name for s in cfg.stages]
    if stage is not None and stage not in names:
        raise ValueError(f"--stage: no stage named {stage!r} (stages: {', '.join(names)})")
    return [(s.name, s.train.nproc) for i, s in enumerate(cfg.stages)
            if (stage is None or s.name == stage) and RD.stage_result(run_dir, cfg, i) is None]


# --------------------------------------------------------------------------- squeue
def squeue_states() -> dict[str, tuple[str, str]] | None:
    """job id -> (state, reason) of every job squeue knows (recently finished ones too);
    None when there is no squeue here or it fails (status then shows job ids only)."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


# --------------------------------------------------------------------------- submit
def _seconds(t: str) -> int | None:
    """SLURM --time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in seconds; None if unreadable."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t.strip())
    if not m:
        return None
    d, a, b, c = (int(x) if x else None for x in m.groups())
    if d is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        return d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    if b is not None:
        return a * 60 + b
    return a * 60


def sbatch_options(stage) -> tuple[list[str], int]:
    """A stage's ``resources`` as sbatch options, and the number of ranks (one task per rank).

    Ranks per node are ``gpus_per_node`` on GPU nodes (one rank drives one GPU), else
    ``train.nproc / nodes``. When nodes × gpus_per_node is not ``train.nproc`` (the stage moved to
    another node count), the stage runs on that many ranks and the trainer keeps the config's global
    batch (gradient accumulation absorbs the difference), resuming from its checkpoint if any.
    """
    from llmagogy_ds.config import ConfigError

    res, name, nproc = stage.resources, stage.name, stage.train.nproc
    where = f"stages.{name}.resources"
    nodes = int(res.get("nodes", 1))
    if "gpus_per_node" in res:
        per_node = int(res["gpus_per_node"])
    elif nproc % nodes:
        raise ConfigError(f"{where}.nodes: train.nproc={nproc} ranks cannot be split evenly over {nodes} nodes")
    else:
        per_node = nproc // nodes
    opts = [f"--nodes={nodes}", f"--ntasks-per-node={per_node}"]
    if "gpus_per_node" in res:
        opts.append(f"--gpus-per-node={per_node}")
    if "cpus_per_task" in res:
        opts.append(f"--cpus-per-task={int(res['cpus_per_task'])}")
    if "time" in res:
        secs = _seconds(res["time"])
        if secs is not None and secs <= SIGNAL_GRACE_S + 60:
            raise ConfigError(f"{where}.time: {res['time']!r} leaves no training time: the job is told to "
                              f"checkpoint {SIGNAL_GRACE_S} s before its time limit")
        opts.append(f"--time={res['time']}")
    for key in ("partition", "account"):
        if key in res:
            opts.append(f"--{key}={res[key]}")
    extra = res.get("sbatch_args", [])
    opts += shlex.split(extra) if isinstance(extra, str) else list(extra)
    return opts, nodes * per_node


# The argument that chains a job to the previous stage's; its ``{prev}`` becomes that job's id. Only an
# argument equal to it is filled in: ``{prev}`` inside other arguments (sbatch_args) stays as written.
DEPENDENCY = "--dependency=afterok:{prev}"


def sources_to_tokenize(cfg, run_dir: Path) -> list[str]:
    """Text sources (not generated: those take a second) whose cache entry is not complete yet:
    the work of a tokenization job. Without the run's tokenizer yet, every such source."""
    from llmagogy_ds.data.cache import cache_root, source_key
    from llmagogy_ds.data.corpus import file_sha

    tok = RD.tokenizer_path(run_dir)
    sha = file_sha(tok) if tok.exists() else None
    cache = cache_root(cfg.run.data_cache, run_dir)
    todo: list[str] = []
    for stage in cfg.stages:
        for src in stage.data:
            if src.format != "text" or src.is_synthetic or src.path in todo:
                continue
            if sha is None or not (cache / source_key(src, cfg.run.seed, sha) / "meta.json").exists():
                todo.append(src.path)
    return todo


def tokenize_command(cfg, run_dir: Path, python: str, parts: int = 1, cpus: int = 16,
                     time_limit: str = "24:00:00") -> list[str]:
    """The tokenization job: ``parts`` array tasks of ``cpus`` CPUs each (``llmagogy tokenize
    --partition``), on the first stage's partition and account."""
    run_dir = Path(run_dir).resolve()
    res = cfg.stages[0].resources
    cmd = ["sbatch", "--parsable", f"--job-name={cfg.run.name}-tokenize", "--nodes=1", "--ntasks=1",
           f"--cpus-per-task={cpus}", f"--time={time_limit}"]
    if parts > 1:
        cmd.append(f"--array=0-{parts - 1}")
    cmd += [f"--{key}={res[key]}" for key in ("partition", "account") if key in res]
    return cmd + [f"--output={run_dir / 'slurm' / 'tokenize-%A_%a.log'}", f"--export=ALL,LLMAGOGY_PYTHON={python}",
                  str(TOKENIZE_SCRIPT), str(RD.frozen_config_path(run_dir)), "--run-dir", str(run_dir)]


def sbatch_commands(cfg, run_dir: Path, stages: list[str], python: str = sys.executable) -> list[list[str]]:
    """One sbatch command per stage; ``DEPENDENCY`` stands for the dependency on the previous job."""
    if not STAGE_SCRIPT.exists():
        raise RuntimeError(f"{STAGE_SCRIPT}: job script not found (llmagogy submit needs a source checkout, "
                           "installed with pip install -e)")
    run_dir = Path(run_dir).resolve()
    cmds = []
    for i, name in enumerate(stages):
        stage = cfg.stage(name)
        opts, ranks = sbatch_options(stage)
        # the jobs use this Python (its venv), whatever the compute node's PATH holds
        export = f"--export=ALL,LLMAGOGY_PYTHON={python}"
        if ranks != stage.train.nproc:
            export += f",LLMAGOGY_NPROC={ranks}"
            print(f"[llmagogy] stage {name}: {ranks} ranks (resources) instead of train.nproc={stage.train.nproc}; "
                  "the global batch stays the config's", file=sys.stderr)
        cmd = ["sbatch", "--parsable", f"--job-name={cfg.run.name}-{name}", *opts,
               f"--output={run_dir / 'slurm' / f'{name}-%j.log'}", export]
        if i:
            cmd += [DEPENDENCY, "--kill-on-invalid-dep=yes"]
        # the frozen config: a job that starts hours later is not affected by edits to CONFIG
        cmd += [str(STAGE_SCRIPT), str(RD.frozen_config_path(run_dir)), "--run-dir", str(run_dir), "--stage", name]
        cmds.append(cmd)
    return cmds


def _only_resources_differ(a: dict, b: dict) -> bool:
    def strip(raw: dict) -> dict:
        raw = json.loads(json.dumps(raw))
        raw.get("defaults", {}).pop("resources", None)
        for s in raw.get("stages", []):
            s.pop("resources", None)
        return raw

    return strip(a) == strip(b)


def open_for_submit(cfg, run_dir: Path, dry_run: bool):
    """The run dir's config for the jobs, after the same check as ``llmagogy run``.

    One exception to "a different config is refused": a change of ``resources`` only (nodes,
    partition, time...) is accepted. It does not change what is trained, and moving a stage to
    other nodes must not need a new run. The frozen config is kept; the new resources are used
    for this submission.
    """
    import yaml

    from llmagogy_ds import rundir as RD

    frozen = RD.frozen_config_path(run_dir)
    if frozen.exists() and frozen.read_text() != cfg.to_yaml():
        old = RD.load_run_config(run_dir)
        if _only_resources_differ(yaml.safe_load(frozen.read_text()), cfg.raw):
            print(f"[llmagogy] {run_dir}: only resources differ from the run's config: submitting with the new ones",
                  file=sys.stderr)
            return old
    if dry_run and (not frozen.exists() or (frozen.read_text() != cfg.to_yaml() and RD.replaceable(run_dir))):
        return cfg  # nothing written in a dry run
    # refuses a different config, with the differences; the job's `llmagogy prepare` confirms it, and
    # until then (a data error in the job) a fixed config may replace it
    RD.open_run_dir(cfg, run_dir, until_prepared=True)
    return cfg


@dataclass
class Job:
    """One sbatch job of a submission. ``cmd`` holds ``DEPENDENCY`` where its dependencies go;
    ``after``: an int is an earlier job of the same submission (its index), a str a job id
    already queued."""

    run_dir: Path
    name: str  # the stage, or "tokenize"
    cmd: list[str]
    after: list = field(default_factory=list)


def dependency_slot(cmd: list[str]) -> list[str]:
    """``cmd`` with a place for its dependencies (after ``--parsable``) if it has none."""
    if DEPENDENCY not in cmd:
        i = cmd.index("--parsable") + 1
        cmd[i:i] = [DEPENDENCY, "--kill-on-invalid-dep=yes"]
    return cmd


def run_jobs(cfg, run_dir: Path, dry_run: bool = False, python: str = sys.executable, tokenize: dict | None = None,
             base: int = 0, only=None, tokenized_before: set[str] = frozenset()) -> list[Job]:
    """The jobs of a run's remaining stages (``only``: of these stages), each after the one before
    (``base``: the index of the first in the whole submission). First, when a text source is not
    tokenized yet (nor in ``tokenized_before``: by jobs this run waits for), a CPU job that
    tokenizes it (``tokenize``: the keyword arguments of ``tokenize_command``), so that the GPU
    jobs only memory-map the tokens."""
    from llmagogy_ds import rundir as RD

    run_dir = Path(run_dir).resolve()
    if not dry_run:  # before the run dir is opened: a queued job must not see its config replaced
        _check_no_live_jobs(run_dir)
    given = {s.name: s.resources for s in cfg.stages}
    run_cfg = open_for_submit(cfg, run_dir, dry_run)
    for s in run_cfg.stages:  # resources as given now (they may differ from the frozen ones)
        s.resources = given[s.name]
    todo = [s.name for i, s in enumerate(run_cfg.stages) if (only is None or s.name in only)
            and not (RD.stage_dir(run_dir, run_cfg, i) / "result.json").exists()]
    if not todo:
        return []
    cmds = sbatch_commands(run_cfg, run_dir, todo, python)
    pending = [p for p in sources_to_tokenize(run_cfg, run_dir) if p not in tokenized_before]
    if pending:
        print(f"[llmagogy] {run_dir.name}: a tokenization job first, for {len(pending)} source(s) not in the data "
              "cache yet", file=sys.stderr)
        dependency_slot(cmds[0])  # the first stage now waits for the tokenization job
        cmds.insert(0, tokenize_command(run_cfg, run_dir, python, **(tokenize or {})))
        todo = ["tokenize", *todo]
    return [Job(run_dir, name, cmd, [base + i - 1] if i else []) for i, (name, cmd) in enumerate(zip(todo, cmds))]


def submit_jobs(jobs: list[Job], dry_run: bool = False) -> list[str]:
    """Submit ``jobs`` in order, each with ``--dependency=afterok`` on its ``after``; returns the
    job ids. A dry run prints them as a shell script (``JOBn=$(sbatch ...)``) and submits nothing."""
    if dry_run:
        for i, job in enumerate(jobs):
            deps = [f"$JOB{a}" if isinstance(a, int) else a for a in job.after]
            print(f"JOB{i}=$(" + _shell_join(job.cmd, deps) + ")")
        return []
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: run llmagogy submit where SLURM's commands are (a login node), "
                           "or see the commands with --dry-run")
    ids: list[str] = []
    for job in jobs:
        (job.run_dir / "slurm").mkdir(exist_ok=True)
        cmd = _with_deps(job.cmd, [ids[a] if isinstance(a, int) else a for a in job.after])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            done = ", ".join(f"{j.run_dir.name}/{j.name}={i}" for j, i in zip(jobs, ids)) or "none"
            raise RuntimeError(f"sbatch for stage {job.name!r} of {job.run_dir} failed (exit {out.returncode}): "
                               f"{out.stderr.strip()}\nsubmitted before it: {done}")
        ids.append(out.stdout.strip().split(";")[0])
        record_jobs(job.run_dir, [{"stage": job.name, "job_id": ids[-1], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "by": "submit", "command": cmd}])
        print(f"[llmagogy] {job.run_dir.name}: stage {job.name}: job {ids[-1]}", flush=True)
    for d in dict.fromkeys(j.run_dir for j in jobs):
        print(f"[llmagogy] watch with: llmagogy status {d}")
    return ids


def submit(cfg, run_dir: Path, dry_run: bool = False, python: str = sys.executable,
           tokenize: dict | None = None) -> list[str]:
    """Submit one job per remaining stage, chained with afterok (``run_jobs``); returns the job ids."""
    jobs = run_jobs(cfg, run_dir, dry_run, python, tokenize)
    if not jobs:
        print(f"[llmagogy] {Path(run_dir).resolve()}: every stage is done; nothing to submit")
    return submit_jobs(jobs, dry_run)


def _check_no_live_jobs(run_dir: Path) -> None:
    live = squeue_states() or {}
    busy = sorted({j for j in stage_jobs(run_dir).values() if live.get(j, ("",))[0] in ACTIVE})
    if busy:
        raise RuntimeError(f"{run_dir}: job(s) {', '.join(busy)} of this run are still queued or running; "
                           f"two job chains on one run dir would overwrite each other: scancel them or wait")


def _with_deps(cmd: list[str], deps: list[str]) -> list[str]:
    """``cmd`` with its dependency on the jobs ``deps``; without any (a first job), no dependency."""
    if not deps:
        return [a for a in cmd if a != DEPENDENCY]
    return [DEPENDENCY.replace("{prev}", ":".join(deps)) if a == DEPENDENCY else a for a in cmd]


def _shell_join(cmd: list[str], deps: list[str]) -> str:
    """shlex.join of the command, with the dependencies as shell variables (``$JOB0``; double-quoted,
    the one thing the shell expands) or job ids: the dry run prints a script that submits the
    chain, in which no argument is read as shell code."""
    out = []
    for a in cmd:
        if a != DEPENDENCY:
            out.append(shlex.quote(a))
        elif deps:  # a first job depends on nothing
            out.append(shlex.quote(DEPENDENCY.replace("{prev}", ""))
                       + ":".join(f'"{d}"' if d.startswith("$") else shlex.quote(d) for d in deps))
    return " ".join(out)


# --------------------------------------------------------------------------- status
def _last_metrics(path: Path) -> dict:
    """Last step, train loss and held-out loss in a stage's metrics.jsonl."""
    from llmagogy_ds.train.metrics import read_records

    out: dict = {}
    for rec in read_records(path):
        if "step" in rec:
            out["step"] = rec["step"]
        for key in ("loss", "heldout_loss"):
            if rec.get(key) is not None:
                out[key] = rec[key]
    return out


def total_steps(stage) -> int | None:
    """Optimizer steps of a stage (``TrainConfig.steps_for``, the trainer's rule); None for an
    ``epochs`` budget, whose corpus size status does not know until the stage has run."""
    t = stage.train
    if t.tokens is None:
        return None
    return t.steps_for(stage.model.seq_len, epoch_tokens=0)  # a token budget does not read the corpus


def status_rows(run_dir: Path) -> list[dict]:
    from llmagogy_ds.train import checkpoint as C
    from llmagogy_ds import rundir as RD

    cfg = RD.load_run_config(run_dir)
    jobs = stage_jobs(run_dir)
    states = squeue_states()
    rows = []
    for i, st in enumerate(cfg.stages):
        sdir = RD.stage_dir(run_dir, cfg, i)
        row = {"stage": st.name, "total": total_steps(st), "job": jobs.get(st.name), "job_state": None}
        if row["job"] and states is not None:
            row["job_state"] = states.get(row["job"], ("gone", ""))[0]
        result = RD.stage_result(run_dir, cfg, i)
        if result is not None:
            row.update(status="done", step=result["steps"], total=result["steps"], heldout_loss=result["loss_end"],
                       loss=_last_metrics(sdir / RD.METRICS).get("loss"))
        else:
            m = _last_metrics(sdir / RD.METRICS)
            ckpts = sdir / RD.CHECKPOINTS
            tag = C.latest_complete(ckpts)
            ckpt_step = C.checkpoint_info(ckpts, tag)["step"] if tag else None
            row.update(step=m.get("step", ckpt_step), checkpoint=ckpt_step, loss=m.get("loss"),
                       heldout_loss=m.get("heldout_loss"), checkpoint_problems=C.problems(ckpts))
            if row["job_state"] in ("RUNNING", "COMPLETING", "SIGNALING"):
                row["status"] = "running"
            elif row["job_state"] in ACTIVE:
                row["status"] = "queued"
            elif row["step"] is not None:
                row["status"] = "stopped"  # trained part-way, no job on it now: submit again to resume
            else:
                row["status"] = "pending"
        rows.append(row)
    return rows


def print_status(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = status_rows(run_dir)
    t = Table(title=f"{run_dir}")
    for col in ("stage", "status", "step", "checkpoint", "loss", "held-out", "job", "job state"):
        t.add_column(col)

    f = num
    for r in rows:
        step = "-" if r.get("step") is None else f"{r['step']}/{r['total'] if r['total'] else '?'}"
        t.add_row(r["stage"], r["status"], step, f(r.get("checkpoint"), "{}"), f(r.get("loss")),
                  f(r.get("heldout_loss")), r["job"] or "-", (r["job_state"] or "-").lower())
    Console(width=150).print(t)
    for r in rows:  # torn or set-aside checkpoints: resume skips them, the user should know
        for name, what in (r.get("checkpoint_problems") or {}).items():
            print(f"{r['stage']}: checkpoint {name}: {what}")


# --------------------------------------------------------------------------- helpers for stage.sh
def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmagogy_ds.cluster.slurm", description="helpers for slurm/stage.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("todo", help="print 'NAME NPROC' of each unfinished stage")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--stage")
    p = sub.add_parser("note", help="record that job JOB_ID runs STAGE (for llmagogy status)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("stage")
    p.add_argument("job_id")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "todo":
            for name, nproc in remaining_stages(args.run_dir, args.stage):
                print(name, nproc)
        elif stage_jobs(args.run_dir).get(args.stage) != args.job_id:  # a requeued job notes it once
            record_jobs(args.run_dir, [{"stage": args.stage, "job_id": args.job_id,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "by": "stage.sh"}])
    except (ValueError, RuntimeError, OSError) as e:
        print(f"llmagogy: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
