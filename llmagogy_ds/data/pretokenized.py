"""Pre-tokenized sources, used in place, never copied: a megatron-core indexed dataset
(``format: megatron``, ``path`` the prefix of ``PREFIX.bin`` + ``PREFIX.idx``, as written by
Megatron-LM / gpt-neox ``preprocess_data.py``) or a flat numpy token file (``format: numpy``,
``dtype`` given).

Checked once before any compute (the result is the source's cache entry): the files are
whole (an ``.idx`` that megatron can read, a ``.bin`` of the size the index says), every id is
below the run's vocabulary size, and a tokenizer hash recorded beside the data
(``PREFIX.tokenizer.sha256`` / ``FILE.tokenizer.sha256``, the run's ``tokenizer.json``
sha256) equals the run's.

Without ``heldout:``, the last 1/20 of the documents (megatron; at least one) or of the tokens
(numpy) is held out: a contiguous tail of the same file, read in place.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from llmagogy_ds.data.reading import HELDOUT_EVERY, DataError

SHA_SUFFIX = ".tokenizer.sha256"
_HEADER = b"MMIDIDX\x00\x00"
_SCAN = 1 << 24  # tokens per read of the vocabulary check: bounded memory


def megatron_indexed():
    """megatron-core's indexed_dataset module; the package's warnings about missing fused
    kernels (Transformer Engine, Apex) say nothing about data and are silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def files_of(src, path: str) -> list[Path]:
    return [Path(path + ".idx"), Path(path + ".bin")] if src.format == "megatron" else [Path(path)]


def check_indexed(prefix: str) -> tuple[np.dtype, int, int]:
    """(dtype, documents, tokens) of a megatron indexed dataset, or a one-line error on a
    missing, corrupt or truncated ``.idx`` / ``.bin``."""
    DType = megatron_indexed().DType
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for f in (idx, bin_):
        if not f.is_file():
            raise DataError(f"{f}: no such file (a megatron dataset is PREFIX.idx + PREFIX.bin)")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _HEADER:
        raise DataError(f"{idx}: not a megatron-core index (bad header)")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise DataError(f"{idx}: index version {version}, expected 1")
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except Exception:
        raise DataError(f"{idx}: unknown token dtype code {code}") from None
    want = 34 + 4 * seqs + 8 * seqs + 8 * docs
    if size < want:
        raise DataError(f"{idx}: truncated ({size} bytes, the header announces {seqs} sequences and {docs - 1} "
                        f"documents: {want} bytes)")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=34, shape=(seqs,)) if seqs else np.zeros(0, np.int32)
    tokens = int(lengths.sum(dtype=np.int64))
    if bin_.stat().st_size != tokens * dtype.itemsize:
        raise DataError(f"{bin_}: {bin_.stat().st_size} bytes, but its index counts {tokens} tokens of "
                        f"{dtype.itemsize} bytes ({tokens * dtype.itemsize} bytes): truncated or not its .bin")
    if seqs != docs - 1:
        raise DataError(f"{idx}: {seqs} sequences in {docs - 1} documents: only one sequence a document is read")
    return dtype, seqs, tokens


def _check_numpy(path: str, dtype: str) -> int:
    f = Path(path)
    if not f.is_file():
        raise DataError(f"{f}: no such file (format: numpy)")
    item = np.dtype(dtype).itemsize
    if f.stat().st_size % item:
        raise DataError(f"{f}: {f.stat().st_size} bytes is not a whole number of {dtype} tokens: truncated, "
                        "or another dtype")
    if f.stat().st_size == 0:
        raise DataError(f"{f}: no tokens (the file is empty)")
    return f.stat().st_size // item


def _check_sha(data_file: str, tokenizer_sha: str) -> None:
    side = Path(data_file + SHA_SUFFIX)
    if side.is_file():
        recorded = side.read_text().strip()
        if recorded != tokenizer_sha:
            raise DataError(f"{side}: the data was tokenized with tokenizer sha256 {recorded[:12]}…, the run's "
                            f"tokenizer is {tokenizer_sha[:12]}…: set tokenizer.path to the data's tokenizer")


def check_vocab(tokens: np.ndarray, vocab: int, where: str) -> None:
    for i in range(0, len(tokens), _SCAN):
        block = tokens[i: i + _SCAN]
        if len(block) and int(block.max()) >= vocab:
            j = i + int(np.argmax(block >= vocab))
            raise DataError(f"{where}: token id {int(tokens[j])} at token {j} is not below the run's vocabulary "
                            f"size {vocab}: the data was tokenized with another tokenizer (set tokenizer.path)")


def _stream(path: str, fmt: str, dtype: str | None) -> tuple[dict, np.ndarray, int]:
    """(spec of the whole file, its tokens memory-mapped, its documents or tokens)."""
    if fmt == "megatron":
        _, docs, tokens = check_indexed(path)
        ds = megatron_indexed().IndexedDataset(path)
        arr = ds.get(0, 0, tokens) if docs else np.zeros(0, np.uint16)
        return {"format": "megatron", "prefix": path, "documents": [0, docs]}, (arr, ds), docs
    n = _check_numpy(path, dtype)
    return {"format": "numpy", "file": path, "dtype": dtype, "tokens": [0, n]}, (np.memmap(path, dtype=dtype,
                                                                                            mode="r"), None), n


def _tail(spec: dict, n: int, where: str) -> tuple[dict, dict]:
    key = "documents" if spec["format"] == "megatron" else "tokens"
    if n < 2:
        raise DataError(f"{where}: {n} {key}: too few to hold out a tail; give it a heldout: file")
    cut = n - max(1, n // HELDOUT_EVERY)
    return {**spec, key: [0, cut]}, {**spec, key: [cut, n]}


def check_source(src, tokenizer, tokenizer_sha: str, out: Path) -> dict:
    """The cache entry of a pre-tokenized source: stream specs in place, after the checks."""
    vocab = tokenizer.get_vocab_size()
    specs, counts = {}, {}
    for role, path in (("train", src.path), ("heldout", src.heldout)):
        if path is None:
            continue
        data_file = path + ".bin" if src.format == "megatron" else path
        spec, (arr, ds), n = _stream(path, src.format, src.dtype)  # ds: the view lives while ds does
        _check_sha(path, tokenizer_sha)
        check_vocab(arr, vocab, data_file)
        specs[role] = spec
        del arr, ds
    if src.heldout is None:
        n = specs["train"]["documents" if src.format == "megatron" else "tokens"][1]
        specs["train"], specs["heldout"] = _tail(specs["train"], n, src.path)
    for role, spec in specs.items():
        counts[role] = {"tokens": stream_tokens(spec)}
    out.mkdir(parents=True, exist_ok=True)
    return {"source": {"path": src.path, "heldout": src.heldout, "format": src.format},
            "tokenizer_sha256": tokenizer_sha, "vocab_size": vocab, "counts": counts, **specs}


# --------------------------------------------------------------------------- reading a spec
def open_stream(spec, root: Path, dtype: str) -> tuple[np.ndarray, object]:
    """The tokens of a stream spec, memory-mapped: a megatron dataset's documents ``[a, b)`` or
    a numpy file's tokens ``[a, b)``; a bare file name (older caches, tests) is a whole numpy
    file in ``root`` of ``dtype``. Also the object that owns the map: the array is valid only
    while it lives (``IndexedDataset`` closes its map when collected)."""
    if isinstance(spec, str):
        return np.memmap(root / spec, dtype=dtype, mode="r"), None
    if spec["format"] == "numpy":
        a, b = spec["tokens"]
        return np.memmap(spec["file"], dtype=spec["dtype"], mode="r")[a:b], None
    a, b = spec["documents"]
    ds = megatron_indexed().IndexedDataset(spec["prefix"])
    if a == b:
        return np.zeros(0, dtype=ds.index.dtype), ds
    n = int(ds.sequence_lengths[a:b].sum(dtype=np.int64))
    return ds.get(a, 0, n), ds  # documents are contiguous in the .bin: one memory-mapped view of them all


def stream_tokens(spec) -> int:
    if spec["format"] == "numpy":
        return spec["tokens"][1] - spec["tokens"][0]
    a, b = spec["documents"]
    ds = megatron_indexed().IndexedDataset(spec["prefix"])  # alive while its lengths are read: it owns their map
    return int(ds.sequence_lengths[a:b].sum(dtype=np.int64))


__all__ = ["megatron_indexed", "check_source", "check_indexed", "check_vocab", "open_stream", "stream_tokens", "files_of", "SHA_SUFFIX"]
