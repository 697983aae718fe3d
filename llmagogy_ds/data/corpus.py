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
from contextlib import contextmanager
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


class _BadRecord(Exception):
    """A record whose text field is not text (raised inside _read, named with its file outside)."""


def _documents(ds, field: str, where) -> list[str]:
    if field not in ds.column_names:
        raise DataError(f"{where}: no field {field!r} (fields: {ds.column_names}); set text_field")
    docs = []
    for i, t in enumerate(ds[field]):
        if isinstance(t, str):
            if t.strip():
                docs.append(t.strip())
        elif t is not None:
            raise _BadRecord(f"record {i + 1}: field {field!r} is {type(t).__name__} ({str(t)[:40]!r}), not text")
    return docs


@contextmanager
def _quiet_datasets():
    """datasets logs its own error lines before raising; ours name the file and line instead."""
    import datasets

    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)


def _read(files: list[Path], kind: str, text_field: str, cache_dir: str | None) -> list[str]:
    paths = [str(f) for f in files]
    with _quiet_datasets() as datasets:
        return _read_with(datasets, paths, kind, text_field, cache_dir)


def _read_with(datasets, paths: list[str], kind: str, text_field: str, cache_dir: str | None) -> list[str]:
    if kind == ".txt":
        ds = datasets.load_dataset("text", data_files=paths, sample_by="paragraph", split="train", cache_dir=cache_dir)
        return _documents(ds, "text", paths[0])
    builder = "parquet" if kind == ".parquet" else "json"
    ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir)
    return _documents(ds, text_field, paths[0])


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _why_unreadable(f: Path, e: Exception) -> str:
    """One line on why ``datasets`` could not read ``f``: the bad JSON line, or the root cause."""
    if isinstance(e, _BadRecord):
        return str(e)
    if f.suffix in (".jsonl", ".json"):
        text = f.read_text(encoding="utf-8")
        try:
            json.loads(text)  # one JSON document (a .json file) is not JSON lines
        except json.JSONDecodeError:
            for lineno, line in enumerate(text.splitlines(), 1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"line {lineno}: bad JSON ({bad.msg} at column {bad.colno})"
    cause = _root_cause(e)
    what = "a parquet file" if f.suffix == ".parquet" else f"{f.suffix} data"
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    return f"cannot be read as {what} ({reason})"


def _load_local(files: list[Path], text_field: str, cache_dir: str | None) -> list[str]:
    files = [f for f in files if f.stat().st_size > 0]  # no documents (and datasets cannot infer a schema)
    if not files:
        return []
    kinds = {f.suffix for f in files}
    if len(kinds) > 1:
        return [d for f in files for d in _load_local([f], text_field, cache_dir)]
    kind = kinds.pop()
    for f in files:
        check_utf8(f)
    try:
        return _read(files, kind, text_field, cache_dir)
    except DataError:
        raise
    except Exception as e:
        if len(files) > 1:  # find the file at fault: each alone (fine files are quick from the cache)
            for f in files:
                _load_local([f], text_field, cache_dir)
        raise DataError(f"{files[0]}: {_why_unreadable(files[0], e)}") from None


def _local_files(path: str, what: str) -> list[Path]:
    p = Path(path)
    if not p.exists():  # deleted or moved since the config was checked: never a hub lookup
        raise DataError(f"{path}: no such file or directory ({what})")
    return _files(p)


def read_source(src, which: str, seed: int, cache_dir: str | None = None) -> list[str]:
    """Documents of one data source; ``which`` is 'train' or 'heldout'."""
    level = synthetic.parse_path(src.path)
    if level is not None:
        corpus = _synthetic(level, seed)
        return list(corpus.train if which == "train" else corpus.heldout)
    p = Path(src.path)
    split = False  # held out: every HELDOUT_EVERY-th document
    if p.exists() or p.is_absolute():  # the config made every local path absolute; a hub name stays relative
        if src.heldout:
            path = src.path if which == "train" else src.heldout
            docs = _load_local(_local_files(path, f"the {which} data of {src.path}"), src.text_field, cache_dir)
        elif p.is_dir() and _files(p, "heldout") and _files(p, "train"):
            docs = _load_local(_files(p, which), src.text_field, cache_dir)
        else:
            docs, split = _load_local(_local_files(src.path, "a data source"), src.text_field, cache_dir), True
    else:  # a datasets hub name (users with network)
        docs, split = _hub_documents(src, which, cache_dir), True
    if split:
        docs = [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (which == "heldout")]
    if not docs:
        why = (f"it has fewer than {HELDOUT_EVERY} documents, and every {HELDOUT_EVERY}th is held out; give it a "
               "heldout: file" if split and which == "heldout" else "no text that is not blank")
        named = src.heldout if src.heldout and which == "heldout" else src.path
        raise DataError(f"{named}: no {which} documents ({why})")
    return docs


def _hub_documents(src, which: str, cache_dir: str | None) -> list[str]:
    split = src.split if which == "train" else None
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset(src.path, src.name, split=split or src.split, cache_dir=cache_dir)
        return _documents(ds, src.text_field, f"hub dataset {src.path}")
    except DataError:
        raise
    except _BadRecord as e:
        raise DataError(f"hub dataset {src.path}: {e}") from None
    except Exception as e:
        reason = (str(_root_cause(e)).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{src.path}: cannot load it as a hub dataset ({reason}); a local path must exist "
                        "(relative to the config file)") from None


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
        meta = RD.read_json(root / "meta.json")
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
