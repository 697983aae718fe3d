"""One token cache per (source content, tokenizer), shared by every stage, baseline and run.

``CACHE/<key>/`` holds ``train`` and ``heldout`` megatron-core indexed datasets
(``.bin`` + ``.idx``), ``exam.jsonl`` for a generated level, and ``meta.json`` (the marker of a
complete entry, written last). The key hashes what identifies the source's content (paths,
sizes, mtimes, text field, generator and seed; not the mix weight) and the tokenizer's sha256.

Concurrent writers: one process holds ``CACHE/<key>.lock`` (``flock``, released by the kernel if
the holder dies) and builds in ``CACHE/<key>.tmp-<host>-<pid>/``, renamed into place once
complete; the others wait for the marker (``LLMAGOGY_DATA_CACHE_TIMEOUT`` seconds, default 6 h)
and then read it.

Pre-tokenized sources (``format: megatron`` / ``numpy``) are used in place: their entry only
records the check of the tokens against the tokenizer (ids < vocab size, a recorded tokenizer
hash), so that the check runs once, not on every rank.

Where: ``run.data_cache`` in the config, else ``$LLMAGOGY_DATA_CACHE``, else ``data_cache/``
beside the run directory (runs under the same parent share it, on the same file system as
the runs: at the final stage it holds as many bytes as the tokens, 2 or 4 a token).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.data import pretokenized as PT
from llmagogy_ds.data import reading as R
from llmagogy_ds.data import synthetic
from llmagogy_ds.data.tokenize import merge_parts, tokenize_segments, token_dtype

ENV = "LLMAGOGY_DATA_CACHE"
TIMEOUT_ENV = "LLMAGOGY_DATA_CACHE_TIMEOUT"
MARKER = "meta.json"
FORMAT_VERSION = 1  # of the entry layout and the held-out rule; part of the key


def cache_root(configured: str | None, run_dir: Path) -> Path:
    if configured:
        return Path(configured)
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser().resolve()
    return Path(run_dir).resolve().parent / "data_cache"


def source_fingerprint(src, seed: int) -> dict:
    """What identifies a source's content without reading it (paths, sizes, mtimes)."""
    if synthetic.parse_path(src.path) is not None:
        return {"path": src.path, "seed": seed, "generator": synthetic.__name__}
    fp = {"path": src.path, "heldout": src.heldout, "text_field": src.text_field, "split": src.split,
          "name": src.name, "format": src.format, "dtype": src.dtype}
    for key in ("path", "heldout"):
        p = getattr(src, key)
        if not p:
            continue
        files = PT.files_of(src, p) if src.format != "text" else (R._files(Path(p)) if Path(p).exists() else [])
        fp[key + "_files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return fp


def source_key(src, seed: int, tokenizer_sha: str) -> str:
    blob = json.dumps({"source": source_fingerprint(src, seed), "tokenizer": tokenizer_sha, "v": FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, 6 * 3600))


class _Lock:
    """An exclusive ``flock`` on ``path``; the holder's pid and host are written into it for
    the message of those who wait."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a+")

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.f.truncate(0)
        self.f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n")
        self.f.flush()
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _read_marker(entry: Path) -> dict | None:
    return RD.read_json(entry / MARKER) if (entry / MARKER).exists() else None


def ensure_entry(entry: Path, build, what: str) -> dict:
    """The marker of ``entry``, built by ``build(tmp_dir) -> meta`` in this process unless
    another one holds the lock, in which case its result is waited for."""
    meta = _read_marker(entry)
    if meta is not None:
        return meta
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = _Lock(entry.parent / f"{entry.name}.lock")
    deadline, said = time.monotonic() + _timeout(), False
    try:
        while not lock.try_acquire():
            if (meta := _read_marker(entry)) is not None:
                return meta
            if time.monotonic() > deadline:
                raise R.DataError(f"{entry}: {what} is still being prepared by another process ({lock.holder()}); "
                                  f"gave up waiting after {_timeout():.0f} s ({TIMEOUT_ENV}); run `llmagogy "
                                  "tokenize` first, or wait for that process")
            if not said:
                print(f"[llmagogy] waiting for {what}: prepared by {lock.holder()} ({entry})", flush=True)
                said = True
            time.sleep(0.5)
        meta = _read_marker(entry)  # finished while we waited for the lock
        if meta is not None:
            return meta
        for stale in entry.parent.glob(f"{entry.name}.tmp-*"):  # of a killed builder: we hold the lock now
            shutil.rmtree(stale, ignore_errors=True)
        tmp = entry.parent / f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            meta = build(tmp)
            RD.write_atomic(tmp / MARKER, meta)
            if entry.exists():  # an incomplete entry (no marker) of an older layout
                shutil.rmtree(entry)
            os.rename(tmp, entry)  # complete or absent, never half-written
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return meta
    finally:
        lock.release()


def _spec(entry: Path, role: str, counts: dict) -> dict:
    return {"format": "megatron", "prefix": str(entry / role), "documents": [0, counts[role]["documents"]]}


def _text_meta(src, seed: int, tokenizer, tokenizer_sha: str, counts: dict, entry: Path) -> dict:
    for role in ("train", "heldout"):
        if counts[role]["documents"] == 0:
            raise R.no_documents_error(src, role)
    return {"source": source_fingerprint(src, seed), "tokenizer_sha256": tokenizer_sha,
            "vocab_size": tokenizer.get_vocab_size(), "dtype": token_dtype(tokenizer.get_vocab_size()).__name__,
            "counts": counts, **{role: _spec(entry, role, counts) for role in ("train", "heldout")}}


def _write_exam(src, seed: int, out: Path) -> None:
    items = R.exam_items(src, seed)
    if items:
        with open(out / "exam.jsonl", "w") as f:
            for it in items:
                f.write(json.dumps({"prompt": it.prompt, "answer": it.answer, "level": it.level, "kind": it.kind})
                        + "\n")


def _sidecars(out: Path, tokenizer_sha: str) -> None:
    for role in ("train", "heldout"):  # so that the entry can itself be named as a `format: megatron` source
        (out / f"{role}{PT.SHA_SUFFIX}").write_text(tokenizer_sha + "\n")


def _finish_entry(tmp: Path, entry: Path, src, seed: int, tokenizer, tokenizer_sha: str, counts: dict) -> dict:
    """The exam, the tokenizer sidecars and the meta of a tokenized source's entry (built in ``tmp``)."""
    _write_exam(src, seed, tmp)
    _sidecars(tmp, tokenizer_sha)
    meta = _text_meta(src, seed, tokenizer, tokenizer_sha, counts, entry)
    if (tmp / "exam.jsonl").exists():
        meta["exam"] = str(entry / "exam.jsonl")
    return meta


def source_cache(src, tokenizer, tokenizer_sha: str, cache: Path, seed: int, workers: int = 1,
                 progress: bool = False) -> dict:
    """The cache entry of one source (tokenized now if no process has done it): its marker,
    with ``train`` / ``heldout`` stream specs for ``StageData``."""
    entry = Path(cache) / source_key(src, seed, tokenizer_sha)
    if src.format != "text":
        return ensure_entry(entry, lambda tmp: PT.check_source(src, tokenizer, tokenizer_sha, tmp),
                            f"the check of {src.path}")

    def build(tmp: Path) -> dict:
        counts = tokenize_segments(src, R.source_segments(src), tokenizer, tmp, seed, workers,
                                   progress and not src.is_synthetic, R.source_bytes(src), Path(src.path).name)
        return _finish_entry(tmp, entry, src, seed, tokenizer, tokenizer_sha, counts)

    meta = ensure_entry(entry, build, f"the tokens of {src.path}")
    return meta


def partition_cache(src, tokenizer, tokenizer_sha: str, cache: Path, seed: int, part: int, parts: int,
                    workers: int = 1, progress: bool = False) -> dict | None:
    """Partition ``part`` of ``parts`` of a source (a contiguous run of its segments) for a
    cluster array task; the task that completes the last partition merges them into the
    source's entry (returned then; None before)."""
    key = source_key(src, seed, tokenizer_sha)
    entry = Path(cache) / key
    found = _read_marker(entry)
    if found is not None:
        return found
    segs = R.source_segments(src)
    lo, hi = part * len(segs) // parts, (part + 1) * len(segs) // parts
    pdir = Path(cache) / f"{key}.parts-{parts}" / f"{part:05d}"
    ensure_entry(pdir, lambda tmp: {"counts": tokenize_segments(
        src, segs[lo:hi], tokenizer, tmp, seed, workers, progress,
        sum((s[3] or 0) - s[2] for s in segs[lo:hi]), f"{Path(src.path).name} [{part + 1}/{parts}]")},
        f"partition {part + 1}/{parts} of {src.path}")
    done = [Path(cache) / f"{key}.parts-{parts}" / f"{i:05d}" for i in range(parts)]
    if not all((d / MARKER).exists() for d in done):
        return None

    def build(tmp: Path) -> dict:
        counts = merge_parts(done, tmp, tokenizer.get_vocab_size())
        return _finish_entry(tmp, entry, src, seed, tokenizer, tokenizer_sha, counts)

    meta = ensure_entry(entry, build, f"the merge of {src.path}")
    shutil.rmtree(Path(cache) / f"{key}.parts-{parts}", ignore_errors=True)
    return meta


__all__ = ["cache_root", "source_cache", "partition_cache", "source_key", "source_fingerprint", "ensure_entry",
           "ENV", "TIMEOUT_ENV"]
