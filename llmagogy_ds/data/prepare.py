"""A run's data: its tokenizer, every stage's token cache and exams, and (for a baseline run)
the curriculum's held-out sets, prepared once in one process before any compute."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import CurriculumConfig
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.items import load_jsonl


def ensure_tokenizer(cfg: CurriculumConfig, run_dir: Path):
    path = RD.tokenizer_path(run_dir)
    if not path.exists():
        if cfg.tokenizer.path:
            tok = D.load_tokenizer(cfg.tokenizer.path)
        else:
            texts = D.curriculum_texts(cfg, cfg.run.seed, cfg.tokenizer.max_train_bytes)
            tok = D.train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        RD.write_atomic(path, tok.to_str(pretty=True))  # as Tokenizer.save writes it
    return D.load_tokenizer(path), D.file_sha(path)


def stage_data(cfg: CurriculumConfig, run_dir: Path, s: int, tokenizer, tok_sha: str) -> D.StageData:
    return D.prepare_stage_data(cfg.stages[s], tokenizer, tok_sha, RD.data_root(run_dir), cfg.run.seed)


def read_exams(data: D.StageData) -> list[dict]:
    items = []
    for src in data.sources:
        if "exam" in src:
            with open(data.root / src["exam"]) as f:
                items += [json.loads(line) for line in f]
    return items


def prepare_data(cfg: CurriculumConfig, run_dir: Path) -> None:
    """Tokenizer and every stage's token cache: all input errors surface before any compute."""
    if cfg.eval is not None:  # read and check the eval items now, not at the end of stage 1
        for path in cfg.eval.exams:
            load_jsonl(path, kind="exam")
        for path in cfg.eval.pairs:
            load_jsonl(path, kind="pairs")
        for path in cfg.eval.texts:
            D.check_utf8(Path(path))
    tok, sha = ensure_tokenizer(cfg, run_dir)
    for s in range(len(cfg.stages)):
        stage_data(cfg, run_dir, s, tok, sha)
    comparison_data(run_dir, tok, sha)  # a baseline run: the curriculum's held-out sets too


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


__all__ = ["ensure_tokenizer", "stage_data", "read_exams", "prepare_data", "comparison_data", "comparison_windows"]
