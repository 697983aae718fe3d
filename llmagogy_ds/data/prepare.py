"""A run's data: its tokenizer, every stage's token cache and exams, and (for a baseline run)
the curriculum's held-out sets, prepared once in one process before any compute."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.cache import cache_root, partition_cache, source_cache
from llmagogy_ds.data.items import load_jsonl


def run_tokenizer(run_dir: Path):
    """The tokenizer of an existing run (``RUN/tokenizer.json``)."""
    path = RD.tokenizer_path(run_dir)
    if not path.exists():
        raise RD.RunDirError(f"{run_dir}: no {RD.TOKENIZER}")
    return D.load_tokenizer(path)


def ensure_tokenizer(cfg: CurriculumConfig, run_dir: Path):
    path = RD.tokenizer_path(run_dir)
    if not path.exists():
        # the array tasks of a tokenization job start together; the lock is in the cache, not in the run dir
        cache = data_cache(cfg, run_dir)
        cache.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        with open(cache / f"tokenizer-{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                if RD.lineage_path(run_dir).exists():  # an expert branch (train/branch.py) never trains its own
                    raise RD.RunDirError(f"{run_dir}: an expert branch, whose tokenizer is the trunk's and not linked "
                                         "yet: `llmagogy prepare` or `run` it (they link it once the trunk is prepared)")
                if cfg.tokenizer.path:
                    tok = D.load_tokenizer(cfg.tokenizer.path)
                else:
                    texts = D.curriculum_texts(cfg, cfg.run.seed, cfg.tokenizer.max_train_bytes)
                    tok = D.train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
                RD.write_atomic(path, tok.to_str(pretty=True))  # as Tokenizer.save writes it
    return D.load_tokenizer(path), D.file_sha(path)


def default_workers() -> int:
    """Tokenization workers: the CPUs this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def data_cache(cfg: CurriculumConfig, run_dir: Path) -> Path:
    """Where the run's sources are tokenized (``run.data_cache``, ``$LLMAGOGY_DATA_CACHE``, or
    ``data_cache/`` beside the run directory)."""
    return cache_root(cfg.run.data_cache, run_dir)


def stage_data(cfg: CurriculumConfig, run_dir: Path, s: int, tokenizer, tok_sha: str, workers: int | None = None,
               progress: bool = False) -> D.StageData:
    return D.prepare_stage_data(cfg.stages[s], tokenizer, tok_sha, RD.data_root(run_dir), cfg.run.seed,
                                data_cache(cfg, run_dir), workers or default_workers(), progress)


def read_exams(data: D.StageData) -> list[dict]:
    items = []
    for src in data.sources:
        if "exam" in src:
            with open(data.root / src["exam"]) as f:
                items += [json.loads(line) for line in f]
    return items


def check_stage_data(stage, data: D.StageData, what: str = "stage") -> None:
    """What the trainer needs of a stage's packed data, checked before any compute: every source
    has a training window of ``seq_len + 1`` tokens (``BlendedSampler``) and the stage has a
    held-out window (``heldout_windows``). A source too short for a held-out window is left out
    of the held-out loss, as the trainer does; it is said now, not in the middle of the run."""
    need = stage.model.seq_len + 1
    where = f"{what} {stage.name!r}"
    short = [f"{src['path']} ({src['train_tokens']} tokens)" for src in data.sources if src["train_tokens"] < need]
    if short:
        raise D.DataError(f"{where}: the training text of {'; '.join(short)} is shorter than one sequence of "
                          f"seq_len + 1 = {need} tokens: add text or lower model.seq_len")
    heldout_files = [c.heldout or c.path for c in stage.data]  # the file the user gave, if any
    short = [f"{f} ({src['heldout_tokens']} tokens)" for f, src in zip(heldout_files, data.sources)
             if src["heldout_tokens"] < need]
    if len(short) == len(data.sources):
        raise D.DataError(f"{where}: no held-out window: the held-out text of every source is shorter than one "
                          f"sequence of seq_len + 1 = {need} tokens ({'; '.join(short)}): give a longer held-out "
                          "file (heldout:) or lower model.seq_len")
    for s in short:
        print(f"[llmagogy] warning: {where}: the held-out text of {s} is shorter than one sequence of {need} "
              "tokens: it is left out of the stage's held-out loss", file=sys.stderr)


def check_text(path: Path) -> None:
    """An eval text: UTF-8, with some text (bits per byte of nothing is no score)."""
    D.check_utf8(path)
    if not path.read_text(encoding="utf-8").strip():
        raise D.DataError(f"{path}: no text (the file is empty or blank)")


def prepare_data(cfg: CurriculumConfig, run_dir: Path, workers: int | None = None, progress: bool = True) -> None:
    """Tokenizer and every stage's token cache: all input errors surface before any compute.
    ``progress``: a bar for each source that is tokenized now (8 MB or more)."""
    if cfg.eval is not None:  # read and check the eval items now, not at the end of stage 1
        for path in cfg.eval.exams:
            load_jsonl(path, kind="exam")
        for path in cfg.eval.pairs:
            load_jsonl(path, kind="pairs")
        for path in cfg.eval.texts:
            check_text(Path(path))
    tok, sha = ensure_tokenizer(cfg, run_dir)
    for s, stage in enumerate(cfg.stages):
        check_stage_data(stage, stage_data(cfg, run_dir, s, tok, sha, workers, progress))
    for st, data in comparison_data(run_dir, tok, sha).values():  # a baseline: the curriculum's held-out sets
        check_stage_data(st, data, "curriculum stage")


def tokenize_sources(cfg: CurriculumConfig, run_dir: Path, stage: str | None = None, workers: int | None = None,
                     partition: tuple[int, int] | None = None) -> list[tuple[str, dict | None]]:
    """``llmagogy tokenize``: every text source of the curriculum (or of one stage) into the
    data cache, with a progress bar; ``partition=(i, n)``: only the i-th of n contiguous parts
    of each source (a cluster array task; the last to finish merges). Returns (path, entry
    marker or None while partitions are missing)."""
    tok, sha = ensure_tokenizer(cfg, run_dir)
    cache, workers = data_cache(cfg, run_dir), workers or default_workers()
    stages = [cfg.stage(stage)] if stage else cfg.stages
    done, out = set(), []
    for st in stages:
        for src in st.data:
            if src.path in done:
                continue
            done.add(src.path)
            if partition is None or src.format != "text":
                meta = source_cache(src, tok, sha, cache, cfg.run.seed, workers, progress=True)
            else:
                meta = partition_cache(src, tok, sha, cache, cfg.run.seed, partition[0], partition[1], workers,
                                       progress=True)
            out.append((src.path, meta))
    return out


# --------------------------------------------------------------------------- a baseline's comparison sets
def comparison_data(run_dir: Path, tok, tok_sha: str) -> dict[str, tuple]:
    """``{stage name: (StageConfig, StageData)}`` of the curriculum a baseline run is compared
    with, packed in the baseline's run dir with the same tokenizer (so under the curriculum
    run's own cache fingerprints); empty for a curriculum run."""
    ccfg = RD.curriculum_config(run_dir)
    if ccfg is None:
        return {}
    return {st.name: (st, stage_data(ccfg, run_dir, s, tok, tok_sha)) for s, st in enumerate(ccfg.stages)}


def comparison_windows(run_dir: Path, tok) -> dict[str, np.ndarray]:
    """Held-out windows of every curriculum stage, as its trainer builds them (the trainer's
    extra held-out sets; empty for a curriculum run)."""
    if not (Path(run_dir) / RD.CURRICULUM).exists():
        return {}
    sha = D.file_sha(RD.tokenizer_path(run_dir))
    return {name: D.heldout_windows(data, st.model.seq_len, st.train.eval_tokens)
            for name, (st, data) in comparison_data(run_dir, tok, sha).items()}


__all__ = ["run_tokenizer", "ensure_tokenizer", "stage_data", "data_cache", "default_workers", "tokenize_sources", "read_exams", "prepare_data", "check_stage_data", "check_text",
           "comparison_data", "comparison_windows"]
