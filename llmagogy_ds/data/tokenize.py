"""Streaming, parallel tokenization of one source into megatron-core indexed datasets.

Documents flow from the reader (``reading.source_documents``, one pass, held-out split decided
per document) in chunks of at most ``CHUNK_BYTES`` through a pool of worker processes
(``encode.py``), at most ``2 × workers + 1`` chunks in flight, and come back in order straight
into two ``IndexedDatasetBuilder`` (``train``, ``heldout``): memory does not depend on the size
of the source (the builders' index holds one length per document, as megatron's own does).
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from llmagogy_ds.data import encode
from llmagogy_ds.data.pretokenized import megatron_indexed
from llmagogy_ds.data.reading import source_documents

ROLES = ("train", "heldout")
CHUNK_BYTES = 1 << 20  # text per task: large enough to hide the pool's overhead, small enough to bound memory
CHUNK_DOCS = 8192
SMALL_SOURCE = 8 << 20  # below this a pool's start (about a second) costs more than it saves: encode here


def token_dtype(vocab_size: int):
    return megatron_indexed().DType.optimal_dtype(vocab_size)


def _chunks(tagged: Iterator[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    roles: list[str] = []
    docs: list[str] = []
    n = 0
    for r, d in tagged:
        roles.append(r)
        docs.append(d)
        n += len(d)
        if n >= CHUNK_BYTES or len(docs) >= CHUNK_DOCS:
            yield roles, docs
            roles, docs, n = [], [], 0
    if docs:
        yield roles, docs


def _encoded(chunks, tokenizer_json: str, dtype: str, workers: int):
    """``(chunk, (ids, lengths))`` in the order of ``chunks``, with at most ``2 × workers + 1``
    chunks read ahead."""
    if workers <= 0:
        encode.init(tokenizer_json, dtype, threads=None)
        for c in chunks:
            yield c, encode.encode(c[1])
        return
    # spawn, not fork: the caller may hold threads (torch, tokenizers' own pool) that fork would copy mid-state
    pool = mp.get_context("spawn").Pool(workers, encode.init, (tokenizer_json, dtype, 1))
    try:
        pending: deque = deque()
        for c in chunks:
            pending.append((c, pool.apply_async(encode.encode, (c[1],))))
            if len(pending) > 2 * workers:
                c0, r = pending.popleft()
                yield c0, r.get()
        while pending:
            c0, r = pending.popleft()
            yield c0, r.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class Progress:
    """Documents, tokens/s and ETA (by bytes read) on stderr."""

    def __init__(self, desc: str, total_bytes: int | None, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not enabled,
                        file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        self.t0, self.docs, self.tokens = time.perf_counter(), 0, 0

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"{self.docs:,} docs, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def tokenize_segments(src, segments, tokenizer, out: Path, seed: int, workers: int = 1,
                      progress: bool = False, total_bytes: int | None = None, desc: str = "") -> dict:
    """Tokenize the segments of a source into ``out/{train,heldout}.{bin,idx}``; returns the
    documents and tokens of each role."""
    IndexedDatasetBuilder = megatron_indexed().IndexedDatasetBuilder
    dtype = token_dtype(tokenizer.get_vocab_size())
    out.mkdir(parents=True, exist_ok=True)
    builders = {r: IndexedDatasetBuilder(str(out / f"{r}.bin"), dtype=dtype) for r in ROLES}
    counts = {r: {"documents": 0, "tokens": 0} for r in ROLES}
    if total_bytes is not None and total_bytes < SMALL_SOURCE:
        workers = 0
    # a bar for a small source is noise in the log
    bar = Progress(desc or str(src.path), total_bytes, progress and (total_bytes or SMALL_SOURCE) >= SMALL_SOURCE)
    try:
        chunks = _chunks(source_documents(src, seed, segments=segments))
        for (roles, docs), (ids, lengths) in _encoded(chunks, tokenizer.to_str(), np.dtype(dtype).name, workers):
            ends = np.cumsum(lengths)
            # the main process shares the cores with the workers: keep its per-document work to
            # the builder's own call, count per chunk
            adds = {r: builders[r].add_document for r in ROLES}
            for r, a, b in zip(roles, (ends - lengths).tolist(), ends.tolist()):
                adds[r](ids[a:b], [b - a])
            held = np.fromiter((r != ROLES[0] for r in roles), dtype=bool, count=len(roles))
            for r, mask in ((ROLES[0], ~held), (ROLES[1], held)):
                counts[r]["documents"] += int(mask.sum())
                counts[r]["tokens"] += int(lengths[mask].sum())
            bar.update(sum(map(len, docs)), len(docs), int(ends[-1]))
    finally:
        bar.close()
        for r in ROLES:
            builders[r].finalize(str(out / f"{r}.idx"))
    return counts


def merge_parts(parts: list[Path], out: Path, vocab_size: int) -> dict:
    """Concatenate partitions (each ``{train,heldout}.{bin,idx}``) in order with megatron's
    ``IndexedDatasetBuilder.add_index``."""
    mi = megatron_indexed()
    dtype = token_dtype(vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for r in ROLES:
        b = mi.IndexedDatasetBuilder(str(out / f"{r}.bin"), dtype=dtype)
        for p in parts:
            b.add_index(str(p / r))
        b.finalize(str(out / f"{r}.idx"))
        ds = mi.IndexedDataset(str(out / r))
        counts[r] = {"documents": len(ds), "tokens": int(ds.sequence_lengths.sum())}
    return counts


__all__ = ["tokenize_segments", "merge_parts", "token_dtype", "Progress", "ROLES"]
