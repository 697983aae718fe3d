"""Stage corpora: the tokenizer, a stage's token streams, sampling batches.

* Sources are read as streams (``reading.py``) and tokenized once per (source content,
  tokenizer) into megatron-core indexed datasets in a cache shared by every stage, baseline and
  run (``cache.py``, ``tokenize.py``); pre-tokenized sources are used in place
  (``pretokenized.py``).
* One byte-level BPE (``tokenizers``) is trained on a bounded sample of the curriculum, spread
  over each source, or loaded.
* A stage's data (``StageData``) is a small view in ``RUN/data/<stage>-<fingerprint>/meta.json``:
  per source its weight and its train / held-out streams (memory-mapped, never loaded).
* ``BlendedSampler`` maps a global sample index to (source, window) deterministically,
  independent of the number of ranks, so the position saved in a checkpoint is just the
  number of samples consumed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llmagogy_ds import rundir as RD
from llmagogy_ds.data.cache import source_cache, source_fingerprint  # noqa: F401 (size_search keys on it)
from llmagogy_ds.data.encode import EOS
from llmagogy_ds.data.pretokenized import open_stream
from llmagogy_ds.data.reading import (HELDOUT_EVERY, TEXT_SUFFIXES, DataError, check_utf8, exam_items,  # noqa: F401
                                      read_source, sample_documents)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                            show_progress=False)
    return tok._tokenizer  # the plain tokenizers.Tokenizer (saves/loads as tokenizer.json)


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise DataError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise DataError(f"{path}: not a tokenizer.json file ({e})") from None
    if tok.token_to_id(EOS) is None:
        raise DataError(f"{path}: tokenizer has no {EOS} token (needed as document separator)")
    return tok


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- a stage's streams
@dataclass
class StageData:
    """Token streams of one stage: per source, train and held-out (memory-mapped)."""

    root: Path
    sources: list[dict]  # {"path", "weight", "train": spec, "heldout": spec, "train_tokens", "heldout_tokens"}
    dtype: str
    _open: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: Path) -> "StageData":
        meta = RD.read_json(root / "meta.json")
        return cls(root, meta["sources"], meta["dtype"])

    def stream(self, k: int, which: str) -> np.ndarray:
        if (k, which) not in self._open:  # kept with the dataset that owns its memory map
            self._open[(k, which)] = open_stream(self.sources[k][which], self.root, self.dtype)
        return self._open[(k, which)][0]

    @property
    def weights(self) -> list[float]:
        return [s["weight"] for s in self.sources]

    @property
    def train_tokens(self) -> int:
        return sum(s["train_tokens"] for s in self.sources)


def same_heldout(a: StageData, b: StageData, chunk: int = 1 << 24) -> bool:
    """Whether two stage caches hold the same held-out tokens: equal fingerprints, or else the same
    held-out stream of every source, token for token (a corpus copied or touched since, with new
    paths or mtimes, changes the fingerprint, not the tokens)."""
    if a.root.name == b.root.name:
        return True
    if not a.sources or len(a.sources) != len(b.sources):
        return False
    for k, (x, y) in enumerate(zip(a.sources, b.sources)):
        if x["heldout_tokens"] != y["heldout_tokens"] or x["weight"] != y["weight"]:
            return False
        u, v = a.stream(k, "heldout"), b.stream(k, "heldout")
        if len(u) != len(v) or any(not np.array_equal(u[i:i + chunk], v[i:i + chunk]) for i in range(0, len(u), chunk)):
            return False
    return True


def prepare_stage_data(stage, tokenizer, tokenizer_sha: str, data_root: Path, seed: int, cache: Path | None = None,
                       workers: int = 1, progress: bool = False) -> StageData:
    """A stage's view of its sources' caches (each source tokenized once per tokenizer, in
    ``cache``, default ``data_root/cache``): a new weight or stage never re-tokenizes."""
    cache = Path(cache) if cache is not None else Path(data_root) / "cache"
    entries = [source_cache(src, tokenizer, tokenizer_sha, cache, seed, workers, progress) for src in stage.data]
    sources = []
    for src, e in zip(stage.data, entries):
        entry = {"path": src.path, "weight": src.weight, "train": e["train"], "heldout": e["heldout"],
                 "train_tokens": e["counts"]["train"]["tokens"], "heldout_tokens": e["counts"]["heldout"]["tokens"]}
        if "exam" in e:
            entry["exam"] = e["exam"]
        sources.append(entry)
    dtype = str(np.dtype(entries[0].get("dtype") or np.uint16)) if entries else "uint16"
    fp = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(data_root) / f"{stage.name}-{fp}"
    if not (root / "meta.json").exists():
        RD.write_atomic(root / "meta.json", {"stage": stage.name, "fingerprint": fp, "dtype": dtype,
                                             "sources": sources})
    return StageData.load(root)


def curriculum_texts(cfg, seed: int, max_bytes: int) -> Iterator[str]:
    """Training text of every stage for the tokenizer: at most ``max_bytes`` in all, split
    evenly over the stages and, in a stage, over the sources it names first."""
    seen = set()
    for stage in cfg.stages:
        new = [src for src in stage.data if src.path not in seen]
        seen.update(src.path for src in new)
        for src in new:
            if src.format == "text":
                yield from sample_documents(src, seed, max_bytes // max(1, len(cfg.stages)) // len(new))


# --------------------------------------------------------------------------- sampling
def _allocation(weights: list[float], chunk: int) -> list[int]:
    """Largest-remainder split of ``chunk`` samples by weight (every source gets ≥ 1)."""
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * chunk
    n = np.maximum(1, np.floor(raw).astype(int))
    while n.sum() < chunk:
        n[np.argmax(raw - n)] += 1
    while n.sum() > chunk:
        n[np.argmax(n)] -= 1
    return n.tolist()


class BlendedSampler:
    """Global sample index → (source, window start), the same for any number of ranks.

    Samples come in chunks of ``chunk``: each chunk holds every source in proportion to
    its weight, in a seeded random order; inside a source, windows of ``seq_len + 1``
    tokens are visited in a fresh seeded permutation each epoch.
    """

    def __init__(self, data: StageData, seq_len: int, seed: int, chunk: int = 1024):
        self.data, self.seq_len, self.seed, self.chunk = data, seq_len, seed, chunk
        self.streams = [data.stream(k, "train") for k in range(len(data.sources))]
        self.windows = [(len(s) - 1) // seq_len for s in self.streams]
        for k, w in enumerate(self.windows):
            if w < 1:
                raise DataError(f"{data.sources[k]['path']}: {len(self.streams[k])} training tokens, "
                                f"fewer than one sequence of {seq_len + 1}")
        self.alloc = _allocation(data.weights, chunk)
        self.chunk = sum(self.alloc)

    @lru_cache(maxsize=4)
    def _chunk_plan(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.concatenate([np.full(n, k) for k, n in enumerate(self.alloc)])
        order = np.random.default_rng([self.seed, 7, c]).permutation(order)
        rank_in_source = np.zeros_like(order)
        for k in range(len(self.alloc)):
            idx = np.nonzero(order == k)[0]
            rank_in_source[idx] = np.arange(len(idx)) + c * self.alloc[k]
        return order, rank_in_source

    @lru_cache(maxsize=8)
    def _perm(self, k: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, k, epoch]).permutation(self.windows[k])

    def locate(self, i: int) -> tuple[int, int]:
        order, rank = self._chunk_plan(i // self.chunk)
        k, j = int(order[i % self.chunk]), int(rank[i % self.chunk])
        w = self._perm(k, j // self.windows[k])[j % self.windows[k]]
        return k, int(w) * self.seq_len

    def batch(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of global samples ``start .. start + n``."""
        rows = []
        for i in range(start, start + n):
            k, off = self.locate(i)
            rows.append(np.asarray(self.streams[k][off: off + self.seq_len + 1], dtype=np.int64))
        arr = np.stack(rows)
        return arr[:, :-1], arr[:, 1:]

    def epochs(self, samples: int) -> list[float]:
        """How many times each source's training windows are seen in ``samples`` samples."""
        return [samples * a / self.chunk / w for a, w in zip(self.alloc, self.windows)]


def heldout_windows(data: StageData, seq_len: int, max_tokens: int) -> np.ndarray:
    """Fixed held-out sequences (``seq_len + 1`` tokens), split over sources by weight.

    A source whose held-out text is shorter than one sequence has no window: it is left out
    with a warning naming it (its loss would otherwise silently vanish from the stage's
    held-out loss); when no source has a window, it is an error.
    """
    import warnings

    rows = []
    weights = data.weights
    short = []
    for k, w in enumerate(weights):
        s = data.stream(k, "heldout")
        if len(s) < seq_len + 1:
            short.append(f"{data.sources[k]['path']} ({len(s)} held-out tokens)")
            continue
        n = min((len(s) - 1) // seq_len, max(1, int(max_tokens * w / sum(weights)) // seq_len))
        rows += [np.asarray(s[i * seq_len: i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)]
    if not rows:
        raise DataError(f"{data.root}: held-out text shorter than one sequence of {seq_len + 1} tokens in every "
                        f"source: {'; '.join(short)}")
    for what in short:
        warnings.warn(f"held-out text of {what} is shorter than one sequence of {seq_len + 1} tokens: this source "
                      "is left out of the held-out loss (give it a longer held-out file or a shorter seq_len)",
                      stacklevel=2)
    return np.stack(rows)


# reading.py's and cache.py's names that callers have always found here are re-exported
__all__ = ["DataError", "check_utf8", "read_source", "exam_items", "source_fingerprint", "HELDOUT_EVERY",
           "TEXT_SUFFIXES", "train_tokenizer", "load_tokenizer", "prepare_stage_data", "StageData", "BlendedSampler",
           "heldout_windows", "curriculum_texts", "file_sha", "EOS"]
