"""Stage corpora: read sources, train the tokenizer, pack token memmaps, sample batches.

* Sources are read with ``datasets`` (local .txt/.jsonl/.json/.parquet offline, or a hub
  name for users with network) or generated (``synthetic:levelN``). In .txt files a
  document is a paragraph (documents separated by a blank line).
* Held-out text: the source's own (``heldout:`` key, or ``heldout.*`` beside ``train.*``
  in a directory, or the generator's); otherwise every 20th document.
* One byte-level BPE (``tokenizers``) is trained on the whole curriculum, or loaded.
* Each stage is tokenized once into flat uint16/uint32 memmaps per source (train, heldout),
  cached under ``RUN/data/<stage>-<fingerprint of sources + tokenizer>/``.
* ``BlendedSampler`` maps a global sample index to (source, window) deterministically,
  independent of the number of ranks, so the position saved in a checkpoint is just the
  number of samples consumed.
"""
from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llmagogy_ds import rundir as RD

from llmagogy_ds.data import synthetic

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HELDOUT_EVERY = 20  # every 20th document is held out when a source has no held-out split


class DataError(ValueError):
    """Bad input data: names the file/source and the reason."""


# --------------------------------------------------------------------------- reading
def check_utf8(path: Path) -> None:
    """Fail with the file and byte offset of the first invalid UTF-8 sequence."""
    if path.suffix == ".parquet":
        return
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    off = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(dec.getstate()[0])  # bytes of a sequence split across chunks, decoded with this one
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {off - pending + e.start})") from None
            off += len(chunk)
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (truncated sequence at the end)") from None


def _files(p: Path, role: str | None = None) -> list[Path]:
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if role is not None:
        files = [f for f in files if f.stem.startswith(role)]
    return files


def _load_local(files: list[Path], text_field: str, cache_dir: str | None) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    kinds = {f.suffix for f in files}
    if len(kinds) > 1:
        return [d for f in files for d in _load_local([f], text_field, cache_dir)]
    kind = kinds.pop()
    for f in files:
        check_utf8(f)
    paths = [str(f) for f in files]
    if kind == ".txt":
        ds = datasets.load_dataset("text", data_files=paths, sample_by="paragraph", split="train", cache_dir=cache_dir)
        field = "text"
    else:
        builder = "parquet" if kind == ".parquet" else "json"
        ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir)
        field = text_field
    if field not in ds.column_names:
        raise DataError(f"{paths[0]}: no field {field!r} (fields: {ds.column_names}); set text_field")
    return [t.strip() for t in ds[field] if t and t.strip()]


def read_source(src, which: str, seed: int, cache_dir: str | None = None) -> list[str]:
    """Documents of one data source; ``which`` is 'train' or 'heldout'."""
    level = synthetic.parse_path(src.path)
    if level is not None:
        corpus = _synthetic(level, seed)
        return list(corpus.train if which == "train" else corpus.heldout)
    p = Path(src.path)
    if p.exists():
        if src.heldout:
            docs = _load_local(_files(Path(src.path if which == "train" else src.heldout)), src.text_field, cache_dir)
        elif p.is_dir() and _files(p, "heldout") and _files(p, "train"):
            docs = _load_local(_files(p, which), src.text_field, cache_dir)
        else:
            docs = _load_local(_files(p), src.text_field, cache_dir)
            docs = [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (which == "heldout")]
    else:  # a datasets hub name (users with network)
        import datasets

        split = src.split if which == "train" else None
        ds = datasets.load_dataset(src.path, src.name, split=split or src.split, cache_dir=cache_dir)
        docs = [t for t in ds[src.text_field] if t]
        docs = [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (which == "heldout")]
    if not docs:
        raise DataError(f"{src.path}: no {which} documents")
    return docs


@lru_cache(maxsize=16)
def _synthetic(level: int, seed: int):
    return synthetic.generate(level, seed=seed)


def exam_items(src, seed: int) -> list:
    level = synthetic.parse_path(src.path)
    return [] if level is None else list(_synthetic(level, seed).exam)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                            show_progress=False)
    return tok._tokenizer  # the plain tokenizers.Tokenizer (saves/loads as tokenizer.json)


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOS) is None:
        raise DataError(f"{path}: tokenizer has no {EOS} token (needed as document separator)")
    return tok


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(src, seed: int) -> dict:
    """What identifies a source's content without reading it all (path, size, mtime)."""
    if synthetic.parse_path(src.path) is not None:
        return {"path": src.path, "seed": seed, "generator": synthetic.__name__}
    fp = {"path": src.path, "heldout": src.heldout, "text_field": src.text_field, "split": src.split, "name": src.name}
    for key in ("path", "heldout"):
        p = getattr(src, key)
        if p and Path(p).exists():
            fp[key + "_files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _files(Path(p))]
    return fp


# --------------------------------------------------------------------------- packing
def pack(docs: list[str], tokenizer, out: Path) -> int:
    """Tokenize documents, join with EOS, write a flat memmap; returns the token count."""
    eos = tokenizer.token_to_id(EOS)
    dtype = np.uint16 if tokenizer.get_vocab_size() < 65535 else np.uint32
    ids: list[np.ndarray] = []
    for i in range(0, len(docs), 1024):
        for enc in tokenizer.encode_batch(docs[i: i + 1024]):
            ids.append(np.asarray(enc.ids + [eos], dtype=dtype))
    arr = np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)
    RD.write_atomic(out, arr.tofile)  # a killed job never leaves a half-written cache
    return int(arr.size)


@dataclass
class StageData:
    """Packed token streams of one stage: per source, train and held-out."""

    root: Path
    sources: list[dict]  # {"path", "weight", "train": file, "heldout": file, "train_tokens", "heldout_tokens"}
    dtype: str

    @classmethod
    def load(cls, root: Path) -> "StageData":
        meta = json.loads((root / "meta.json").read_text())
        return cls(root, meta["sources"], meta["dtype"])

    def stream(self, k: int, which: str) -> np.ndarray:
        return np.memmap(self.root / self.sources[k][which], dtype=self.dtype, mode="r")

    @property
    def weights(self) -> list[float]:
        return [s["weight"] for s in self.sources]

    @property
    def train_tokens(self) -> int:
        return sum(s["train_tokens"] for s in self.sources)


def prepare_stage_data(stage, tokenizer, tokenizer_sha: str, data_root: Path, seed: int) -> StageData:
    """Tokenize a stage's sources once; reuse the cache when sources and tokenizer match."""
    fp = hashlib.sha256(json.dumps({"sources": [source_fingerprint(s, seed) for s in stage.data],
                                    "weights": [s.weight for s in stage.data],
                                    "tokenizer": tokenizer_sha}, sort_keys=True).encode()).hexdigest()[:16]
    root = data_root / f"{stage.name}-{fp}"
    if (root / "meta.json").exists():
        return StageData.load(root)
    root.mkdir(parents=True, exist_ok=True)
    cache_dir = str(data_root / "hf_cache")
    sources = []
    for k, src in enumerate(stage.data):
        entry = {"path": src.path, "weight": src.weight}
        for which in ("train", "heldout"):
            docs = read_source(src, which, seed, cache_dir)
            n = pack(docs, tokenizer, root / f"src{k}.{which}.bin")
            entry[which] = f"src{k}.{which}.bin"
            entry[f"{which}_tokens"] = n
        items = exam_items(src, seed)
        if items:
            with open(root / f"src{k}.exam.jsonl", "w") as f:
                for it in items:
                    f.write(json.dumps({"prompt": it.prompt, "answer": it.answer, "level": it.level,
                                        "kind": it.kind}) + "\n")
            entry["exam"] = f"src{k}.exam.jsonl"
        sources.append(entry)
    dtype = "uint16" if tokenizer.get_vocab_size() < 65535 else "uint32"
    meta = {"stage": stage.name, "fingerprint": fp, "dtype": dtype, "sources": sources}
    RD.write_atomic(root / "meta.json", meta)  # the marker of a complete cache
    return StageData.load(root)


def curriculum_texts(cfg, seed: int, max_bytes: int) -> Iterator[str]:
    """Training text of every stage, for the tokenizer, capped at ``max_bytes`` per stage."""
    seen = set()
    for stage in cfg.stages:
        budget = max_bytes // max(1, len(cfg.stages))
        for src in stage.data:
            if src.path in seen:
                continue
            seen.add(src.path)
            for d in read_source(src, "train", seed):
                yield d
                budget -= len(d)
                if budget <= 0:
                    break


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


__all__ = ["DataError", "check_utf8", "read_source", "train_tokenizer", "load_tokenizer", "prepare_stage_data",
           "StageData", "BlendedSampler", "heldout_windows", "curriculum_texts", "file_sha", "EOS"]
