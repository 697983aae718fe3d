"""``llmagogy branch TRUNK --from STAGE --experts EXPERTS.yaml``: expert curricula that continue a
trunk run from one of its finished stages, each in its own run directory (``TRUNK/experts/<name>``
by default; ``config/experts.py`` reads the file).

An expert's run dir holds the trunk's stages 0..k as hard links (no copy; checkpoints left out: a
stage with ``result.json`` is done and never resumed) and the trunk's tokenizer as a hard link; its
``run.data_cache`` is the trunk's, so no source of the trunk is tokenized again. ``llmagogy run
EXPERT_DIR`` (or ``submit``) then trains only the expert's own stages (index > k).

``lineage.json`` (``rundir.lineage_path``) records where it grew from::

    {"trunk_run": "/abs/TRUNK", "trunk_name": ..., "from_stage": "general", "from_index": k,
     "trunk_config": stage_keys(trunk)[k], "trunk_weights": "<fingerprint>" or null, "expert": name}

``trunk_config`` is the digest of everything the trunk's stage k could see (``stage_keys``);
``trunk_weights`` is ``evaluation.results.weights_fingerprint`` of stage k: sha256 over its
``result.json`` (steps, losses, FLOPs) and the index of its final weights (every tensor's name,
shape and dtype from the safetensors headers, every shard's size), cheap to compute on any model
size and changed by any retraining. It is null until the trunk's stage k has finished: branching
works before that (submit trunk and experts together), and the links are made when the expert's
first own stage starts (``ensure_branch``, called by ``llmagogy prepare/run`` and by rank 0's
``prepare_stage``), which fails with a clear message while the trunk's stage is not done. At every expert stage start both
digests are checked against the trunk: a trunk stage trained again, or with another config, under
the expert is an error, never a silent mix. The trunk lists its experts in ``TRUNK/experts.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig
from llmagogy_ds.config.experts import ExpertConfig, load_experts
from llmagogy_ds.data.corpus import file_sha
from llmagogy_ds.data.prepare import data_cache


class BranchError(ValueError):
    """A branch that cannot be made or continued; the message names the run dir and the reason."""


# --------------------------------------------------------------------------- what a stage is
def _digest(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_key(cfg: CurriculumConfig) -> str:
    """What the run's tokenizer and token caches depend on: the tokenizer section, the seed and
    every stage's data."""
    raw = cfg.raw
    return _digest([raw.get("tokenizer"), raw.get("run", {}).get("seed"), [s.get("data") for s in raw["stages"]]])


def stage_keys(cfg: CurriculumConfig) -> list[str]:
    """One key per stage: equal keys, equal stages (the same computation: stages 0..k merged with
    the defaults, the run's seed and every other top-level section, and the tokenizer's inputs).
    The run's name is left out."""
    raw = cfg.raw
    common = {k: v for k, v in raw.items() if k not in ("stages", "run")}
    common["run"] = {k: v for k, v in (raw.get("run") or {}).items() if k != "name"}
    common["tokenizer"] = tokenizer_key(cfg)
    return [_digest({**common, "stages": raw["stages"][: k + 1]}) for k in range(len(raw["stages"]))]


def link_file(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where linking fails: another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy ``src`` to ``dst`` with hard links (a copy where linking fails), via a temporary
    name so that a kill leaves no half-made ``dst``. Linked files are never written again in
    place: the run dir's writer replaces files (``rundir.write_atomic``)."""
    tmp = dst.with_name(dst.name + ".linking")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, copy_function=link_file, ignore=shutil.ignore_patterns(*skip) if skip else None)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- the trunk's registry
def read_experts(trunk: Path) -> dict[str, dict]:
    """``TRUNK/experts.json``: ``{name: {"run_dir", "from_stage", "description"}}`` (empty: none)."""
    return RD.read_json(Path(trunk) / RD.EXPERTS) or {}


def expert_dirs(trunk: Path) -> list[Path]:
    return [Path(e["run_dir"]) for e in read_experts(trunk).values()]


# --------------------------------------------------------------------------- branch
def _own_started(run_dir: Path, k: int) -> list[str]:
    """The expert's own stages (index > k) with anything in their stage dir."""
    cfg = RD.load_run_config(run_dir)
    out = []
    for s in range(k + 1, len(cfg.stages)):
        sdir = RD.stage_dir(run_dir, cfg, s)
        if sdir.is_dir() and any(f.is_file() for f in sdir.rglob("*")):
            out.append(cfg.stages[s].name)
    return out


def _check_reopen(e: ExpertConfig, d: Path, lineage: dict, where: str) -> bool:
    """Before anything is created: may ``d`` be (re)made for ``e``? True: it holds this expert
    already with another config, none of its own stages started (the new config replaces it)."""
    RD.check_run_dir_path(d)
    old = RD.read_json(RD.lineage_path(d))
    if old is None:
        if RD.frozen_config_path(d).exists():
            raise BranchError(f"{where}: {d} holds a run that is not an expert branch (no {RD.LINEAGE}): "
                              "choose another --out or expert name")
        return False
    same = {k: old.get(k) for k in ("trunk_run", "from_stage")} == {k: lineage[k] for k in ("trunk_run", "from_stage")}
    if not same:
        raise BranchError(f"{where}: {d} is a branch of {old.get('trunk_run')} from stage {old.get('from_stage')!r}, "
                          f"not of {lineage['trunk_run']} from {lineage['from_stage']!r}: choose another --out")
    if old.get("trunk_config") != lineage["trunk_config"]:
        raise BranchError(f"{where}: {d} grew from the trunk's stages up to {lineage['from_stage']!r} as they were "
                          "configured before (the trunk's config changed since): branch into another --out")
    if not RD.frozen_config_path(d).exists() or RD.frozen_config_path(d).read_text() == e.cfg.to_yaml():
        return False
    started = _own_started(d, lineage["from_index"])
    if started:
        raise BranchError(f"{where}: changed, but {d} has already trained (or started) its stage(s) "
                          f"{', '.join(started)} with the old config; refusing to overwrite them: branch the "
                          "changed expert into another --out (or under another name), or move the old one aside")
    return True


def branch(trunk_run: Path, from_stage: str, experts_file: Path, out: Path | None = None, log=print) -> list[Path]:
    """One run dir per expert of ``experts_file`` continuing ``trunk_run`` from ``from_stage``,
    ready for ``llmagogy run EXPERT_DIR``; returned in the file's order. Every expert is checked
    before anything is created; re-running with the same file changes nothing (it links the
    trunk's stages once they have finished)."""
    from llmagogy_ds.evaluation.results import weights_fingerprint  # torch: not for `submit`'s imports

    trunk = Path(trunk_run).resolve()
    tcfg = RD.load_run_config(trunk)
    names = [s.name for s in tcfg.stages]
    if from_stage not in names:
        raise BranchError(f"--from: no stage {from_stage!r} in {trunk} (its stages: {', '.join(names)})")
    k = names.index(from_stage)
    experts = load_experts(Path(experts_file), tcfg, k, str(data_cache(tcfg, trunk).resolve()))
    out = Path(out).resolve() if out is not None else trunk / RD.EXPERTS_DIR
    lineage = {"trunk_run": str(trunk), "trunk_name": tcfg.run.name, "from_stage": from_stage, "from_index": k,
               "trunk_config": stage_keys(tcfg)[k], "trunk_weights": None}
    registry = read_experts(trunk)
    replace = {}
    for i, e in enumerate(experts):
        where, d = f"{experts_file}: experts[{i}] ({e.name})", out / e.name
        old = registry.get(e.name)
        if old and Path(old["run_dir"]) != d and RD.frozen_config_path(old["run_dir"]).exists():
            raise BranchError(f"{where}: the trunk has an expert {e.name!r} already, in {old['run_dir']}: "
                              "give this one another name")
        replace[e.name] = _check_reopen(e, d, lineage, where)
    dirs = []
    for e in experts:
        d = out / e.name
        if RD.read_json(RD.lineage_path(d)) is None:  # first: a run dir here is never without its lineage
            RD.write_atomic(RD.lineage_path(d), {**lineage, "expert": e.name})
        if replace[e.name]:
            RD.write_atomic(RD.frozen_config_path(d), e.cfg.to_yaml())
            log(f"[llmagogy] branch {e.name}: config changed (no own stage had started): {d}")
        elif not RD.frozen_config_path(d).exists():
            RD.open_run_dir(e.cfg, d, until_prepared=True)
            log(f"[llmagogy] branch {e.name}: {d} (stages {', '.join(e.own_stages(k))} after {from_stage})")
        registry[e.name] = {"run_dir": str(d), "from_stage": from_stage, "description": e.description}
        RD.write_atomic(trunk / RD.EXPERTS, registry)
        if weights_fingerprint(RD.stage_dir(trunk, tcfg, k)) is not None:
            ensure_branch(d, log=log)
        else:
            log(f"[llmagogy] branch {e.name}: the trunk's stage {from_stage} has not finished: its stages are "
                "linked when the expert's first stage starts")
        dirs.append(d)
    return dirs


# --------------------------------------------------------------------------- at an expert's stage start
def link_tokenizer(run_dir: Path, lineage: dict | None = None) -> None:
    """An expert's tokenizer: the trunk's (a hard link), never one of its own (nothing for a run
    dir without ``lineage.json``)."""
    lineage = lineage or RD.read_json(RD.lineage_path(run_dir))
    if lineage is None:
        return
    mine, theirs = RD.tokenizer_path(run_dir), RD.tokenizer_path(lineage["trunk_run"])
    if not mine.exists():
        if not theirs.exists():
            raise BranchError(f"{run_dir}: an expert branch of {lineage['trunk_run']}, whose tokenizer is not there "
                              "yet: prepare or run the trunk first (its tokenizer is the expert's)")
        link_file(theirs, mine)
    elif theirs.exists() and not os.path.samefile(mine, theirs) and file_sha(mine) != file_sha(theirs):
        raise BranchError(f"{run_dir}: its tokenizer is not the trunk's ({theirs}): the trunk was prepared again "
                          "since the branch; branch again into another --out")


def ensure_branch(run_dir: Path, s: int | None = None, log=print) -> dict | None:
    """For an expert run dir (one with ``lineage.json``): link the trunk's tokenizer and, once its
    stage k has finished, its stages 0..k; check the lineage against the trunk (module doc).
    ``s``: the stage about to start, which must be one of the expert's own. None for other runs."""
    from llmagogy_ds.evaluation.results import weights_fingerprint  # torch: not for `submit`'s imports

    run_dir = Path(run_dir)
    lin = RD.read_json(RD.lineage_path(run_dir))
    if lin is None:
        return None
    trunk, k, name = Path(lin["trunk_run"]), lin["from_index"], lin["from_stage"]
    cfg = RD.load_run_config(run_dir)
    if s is not None and s <= k:
        raise BranchError(f"{run_dir}: stage {cfg.stages[s].name!r} is the trunk's ({trunk}), linked into this "
                          "expert branch: an expert trains only its own stages")
    link_tokenizer(run_dir, lin)
    tcfg = RD.load_run_config(trunk) if RD.frozen_config_path(trunk).exists() else None
    if tcfg is not None and (k >= len(tcfg.stages) or tcfg.stages[k].name != name
                             or stage_keys(tcfg)[k] != lin["trunk_config"]):
        raise BranchError(f"{run_dir}: the trunk {trunk}'s stages up to {name!r} are configured differently from "
                          "when this expert was branched (the trunk was restarted with another config): the "
                          "expert grew from the old ones; branch again into another --out")
    mine = weights_fingerprint(RD.stage_dir(run_dir, cfg, k))
    theirs = weights_fingerprint(RD.stage_dir(trunk, tcfg, k)) if tcfg is not None else None
    recorded = lin.get("trunk_weights")
    if recorded and mine and mine != recorded:
        raise BranchError(f"{run_dir}: its copy of the trunk's stage {name!r} is not the one {RD.LINEAGE} records "
                          "(changed in place): branch again into another --out")
    expected = recorded or mine
    if expected is not None and theirs is not None and theirs != expected:
        raise BranchError(f"{run_dir}: the trunk's stage {name!r} ({RD.stage_dir(trunk, tcfg, k)}) changed since "
                          "this expert grew from it (trained again): its weights fingerprint differs from "
                          f"{RD.LINEAGE}'s; branch again into another --out to continue the new one")
    if mine is None:
        if theirs is None:
            raise BranchError(f"{run_dir}: the expert grows from the trunk's stage {name!r}, which has not finished "
                              f"({trunk}): train it first (llmagogy run / submit {trunk})")
        for t in range(k + 1):
            dst = RD.stage_dir(run_dir, cfg, t)
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                link_tree(RD.stage_dir(trunk, tcfg, t), dst, skip=(RD.CHECKPOINTS,))
        log(f"[llmagogy] {run_dir.name}: the trunk's stages up to {name} linked from {trunk}")
        mine = theirs
    if lin.get("trunk_weights") != mine:
        lin["trunk_weights"] = mine
        RD.write_atomic(RD.lineage_path(run_dir), lin)
    return lin


__all__ = ["BranchError", "branch", "ensure_branch", "link_tokenizer", "link_tree", "link_file", "stage_keys",
           "tokenizer_key", "read_experts", "expert_dirs"]
