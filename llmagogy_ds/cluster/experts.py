"""``llmagogy submit`` of a trunk with expert branches (``llmagogy branch``), or of one expert.

After the trunk's chain, each expert's remaining stages (its own, after the branch point) are a
chain of their own whose first stage job waits (afterok) for the trunk's job of the stage the
expert grows from, not for the trunk's last job: the experts train beside the trunk's later
stages. No wait when that stage is done. An expert's tokenization job, when one is needed, waits
for the trunk's (they share the cache and the tokenizer). ``llmagogy submit EXPERT_DIR`` alone
waits for the trunk's recorded job of that stage (``slurm_jobs.json``) while it is queued or
running, and refuses when the stage is neither done nor queued.
"""
from __future__ import annotations

import sys
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.cluster import slurm as S
from llmagogy_ds.train.branch import expert_dirs, link_tokenizer


def trunk_dependency(expert_dir: Path, lineage: dict, trunk_jobs: dict[str, int]) -> int | str | None:
    """What the expert's first stage waits for: the trunk's job of stage ``from`` in this
    submission (its index), else its queued or running job (its id), else nothing (done)."""
    trunk, stage = Path(lineage["trunk_run"]), lineage["from_stage"]
    tcfg = RD.load_run_config(trunk)
    if RD.stage_result(trunk, tcfg, tcfg.stage_index(stage)) is not None:
        return None
    if stage in trunk_jobs:
        return trunk_jobs[stage]
    job = S.stage_jobs(trunk).get(stage)
    states = S.squeue_states()
    if job is not None and (states is None or states.get(job, ("",))[0] in S.ACTIVE):
        if states is None:
            print(f"[llmagogy] {expert_dir.name}: no squeue here: waiting for the trunk's recorded job {job} of stage "
                  f"{stage} without knowing whether it is still queued", file=sys.stderr)
        return job
    raise RuntimeError(f"{expert_dir}: the trunk's stage {stage!r} ({trunk}) has not finished and no job of it is "
                       f"queued or running: submit the trunk first (`llmagogy submit {trunk}` submits its experts "
                       "too)")


def expert_jobs(cfg, expert_dir: Path, trunk_jobs: dict[str, int], base: int, dry_run: bool, python: str,
                tokenize: dict | None) -> list[S.Job]:
    """The jobs of an expert's remaining own stages (``S.run_jobs``), waiting for the trunk's."""
    expert_dir = Path(expert_dir).resolve()
    lineage = RD.read_json(RD.lineage_path(expert_dir))
    if not dry_run and RD.tokenizer_path(lineage["trunk_run"]).exists():
        link_tokenizer(expert_dir, lineage)  # its sources are then looked up in the cache under the trunk's
    own = [s.name for s in cfg.stages[lineage["from_index"] + 1:]]
    # the trunk's sources are in the cache once its stage has finished (its jobs prepare every stage's data)
    trunk_sources = {src.path for st in RD.load_run_config(lineage["trunk_run"]).stages for src in st.data}
    jobs = S.run_jobs(cfg, expert_dir, dry_run, python, tokenize, base=base, only=own, tokenized_before=trunk_sources)
    if not jobs:
        return jobs
    dep = trunk_dependency(expert_dir, lineage, trunk_jobs)
    if jobs[0].name == "tokenize":  # needs the trunk's tokenizer: made by the trunk's tokenization job or stage
        if "tokenize" in trunk_jobs:
            jobs[0].after.append(trunk_jobs["tokenize"])
        elif dep is not None and not RD.tokenizer_path(lineage["trunk_run"]).exists():
            jobs[0].after.append(dep)
    first = next(j for j in jobs if j.name != "tokenize")
    if dep is not None:
        first.after.append(dep)
    for job in jobs:
        if job.after:
            S.dependency_slot(job.cmd)
    return jobs


def submit_run(cfg, run_dir: Path, dry_run: bool = False, python: str = sys.executable,
               tokenize: dict | None = None) -> list[str]:
    """``llmagogy submit``: a run's chain and, for a trunk, its experts' chains; an expert run dir
    alone: its own stages, after the trunk's. Returns the job ids."""
    run_dir = Path(run_dir).resolve()
    if RD.lineage_path(run_dir).exists():
        jobs = expert_jobs(cfg, run_dir, {}, 0, dry_run, python, tokenize)
    else:
        jobs = S.run_jobs(cfg, run_dir, dry_run, python, tokenize)
        trunk_jobs = {j.name: i for i, j in enumerate(jobs)}
        for d in expert_dirs(run_dir):
            jobs += expert_jobs(RD.load_run_config(d), d, trunk_jobs, len(jobs), dry_run, python, tokenize)
    if not jobs:
        print(f"[llmagogy] {run_dir}: every stage is done; nothing to submit")
    return S.submit_jobs(jobs, dry_run)


__all__ = ["submit_run", "expert_jobs", "trunk_dependency"]
