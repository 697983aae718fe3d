"""Reading a source's documents as a stream: nothing holds the corpus.

* ``.txt``: a document is a paragraph (lines up to an empty line). ``.jsonl``: one record a
  line. Both are read by this module line by line, so that a byte range of a file (a partition
  of a cluster job, a window of the tokenizer's sample) is read without the rest; each line is
  decoded on its own, so a non-UTF-8 byte is named with its exact file offset.
* ``.json`` and ``.parquet`` files and hub datasets stream through ``datasets``
  (``streaming=True``).
* Held-out text: the source's own (``heldout:`` key, or ``heldout.*`` beside ``train.*`` in a
  directory, or the generator's); otherwise every 20th document, decided as it is read.
"""
from __future__ import annotations

import codecs
import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from llmagogy_ds.data import synthetic

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SEEKABLE = (".txt", ".jsonl")  # read by byte ranges (partitions, sample windows)
HELDOUT_EVERY = 20  # every 20th document is held out when a source has no held-out split


class DataError(ValueError):
    """Bad input data: names the file/source and the reason."""


class _BadRecord(Exception):
    """A record whose text field is not text (raised while reading, named with its file outside)."""


# --------------------------------------------------------------------------- files
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


def _local_files(path: str, what: str) -> list[Path]:
    p = Path(path)
    if not p.exists():  # deleted or moved since the config was checked: never a hub lookup
        raise DataError(f"{path}: no such file or directory ({what})")
    return [f for f in _files(p) if f.stat().st_size > 0]  # an empty file has no documents


def _decode(line: bytes, path: Path, offset: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {offset + e.start})") from None


def _blank(line: bytes) -> bool:
    return line in (b"\n", b"\r\n", b"")


def _first_line_at(f, start: int) -> tuple[int, bool]:
    """Seek ``f`` to the first line starting at or after ``start``; also whether the line
    before it is empty (so that the line, if not empty, starts a paragraph)."""
    if start <= 0:
        f.seek(0)
        return 0, True
    f.seek(start - 1)
    f.readline()  # the rest of the line that holds byte start - 1
    pos = f.tell()
    f.seek(max(0, pos - 3))
    tail = f.read(pos - max(0, pos - 3))
    f.seek(pos)
    after_blank = tail.endswith(b"\n\n") or tail.endswith(b"\n\r\n") or tail in (b"\n", b"\r\n")
    return pos, after_blank


def txt_documents(path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """Paragraphs of a text file whose first line starts in ``[start, end)`` bytes, stripped."""
    with open(path, "rb") as f:
        pos, after_blank = _first_line_at(f, start)
        lines: list[str] = []
        for line in f:
            if _blank(line):
                if lines:
                    doc = "".join(lines).replace("\r\n", "\n").strip()
                    if doc:
                        yield doc
                    lines = []
                after_blank = True
            elif lines or after_blank:
                if not lines and end is not None and pos >= end:
                    return
                after_blank = False
                lines.append(_decode(line, path, pos))
            pos += len(line)
        if lines:
            doc = "".join(lines).replace("\r\n", "\n").strip()
            if doc:
                yield doc


def _text_of(rec, field: str, where: str, first: bool):
    if not isinstance(rec, dict):
        raise _BadRecord(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if field not in rec:  # in the first record: the wrong field; later: a record without text
        if first:
            raise DataError(f"no field {field!r} (fields: {sorted(rec)}); set text_field")
        return None
    t = rec[field]
    if t is not None and not isinstance(t, str):
        raise _BadRecord(f"{where}: field {field!r} is {type(t).__name__} ({str(t)[:40]!r}), not text")
    return t.strip() if t else None


def jsonl_documents(path: Path, field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The text field of each JSON line starting in ``[start, end)`` bytes."""
    with open(path, "rb") as f:
        pos, _ = _first_line_at(f, start)
        lineno = None if start > 0 else 0  # line numbers are known when reading from the top
        first, recno = True, 0
        for line in f:
            if end is not None and pos >= end:
                return
            if lineno is not None:
                lineno += 1
            text = _decode(line, path, pos)
            at = pos
            pos += len(line)
            if not text.strip():
                continue
            recno += 1
            where = f"record {recno} (line {lineno})" if lineno is not None else f"the record at byte {at}"
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as bad:
                raise DataError(f"{path}: {where}: bad JSON ({bad.msg} at column {bad.colno})") from None
            try:
                doc = _text_of(rec, field, where, first)
                first = False
            except DataError as e:
                raise DataError(f"{path}: {e}") from None
            except _BadRecord as e:
                raise DataError(f"{path}: {e}") from None
            if doc:
                yield doc


@contextmanager
def _quiet_datasets():
    """datasets logs its own error lines before raising; ours name the file instead."""
    import datasets

    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _reason(e: BaseException) -> str:
    cause = _root_cause(e)
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]


def _records(ds, field: str, where: str) -> Iterator[str]:
    for i, rec in enumerate(ds):
        doc = _text_of(rec, field, f"record {i + 1}", i == 0)
        if doc:
            yield doc


def streamed_documents(path: Path, field: str) -> Iterator[str]:
    """A .json or .parquet file through ``datasets`` streaming."""
    if path.suffix == ".json":
        check_utf8(path)
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
            yield from _records(ds, field, str(path))
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except _BadRecord as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:
        what = "a parquet file" if path.suffix == ".parquet" else f"{path.suffix} data"
        raise DataError(f"{path}: cannot be read as {what} ({_reason(e)})") from None


def file_documents(path: Path, field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    if path.suffix == ".txt":
        return txt_documents(path, start, end)
    if path.suffix == ".jsonl":
        return jsonl_documents(path, field, start, end)
    if start > 0:
        raise DataError(f"{path}: a {path.suffix} file is read whole (byte ranges need .txt or .jsonl)")
    return streamed_documents(path, field)


def hub_documents(src) -> Iterator[str]:
    """A hub dataset, streamed (users with network)."""
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, streaming=True)
            yield from _records(ds, src.text_field, src.path)
    except (DataError, _BadRecord) as e:
        raise DataError(f"hub dataset {src.path}: {e}") from None
    except Exception as e:
        raise DataError(f"{src.path}: cannot load it as a hub dataset ({_reason(e)}); a local path must exist "
                        "(relative to the config file)") from None


# --------------------------------------------------------------------------- a source's parts
def source_parts(src) -> list[tuple[str | None, list[Path] | None]]:
    """``[(role, files)]``: role 'train' / 'heldout', or None for a part whose every 20th
    document is held out; files None for a hub dataset."""
    p = Path(src.path)
    if not (p.exists() or p.is_absolute()):  # the config made every local path absolute; a hub name is not
        return [(None, None)]
    if src.heldout:
        return [("train", _local_files(src.path, f"the train data of {src.path}")),
                ("heldout", _local_files(src.heldout, f"the heldout data of {src.path}"))]
    if p.is_dir() and _files(p, "heldout") and _files(p, "train"):
        return [(role, [f for f in _files(p, role) if f.stat().st_size > 0]) for role in ("train", "heldout")]
    return [(None, _local_files(src.path, "a data source"))]


SEGMENT_BYTES = 64 << 20  # held-out counting restarts at each block, so that partitions agree with one pass


def source_segments(src) -> list[tuple[str | None, Path | None, int, int | None]]:
    """A source as ``(role, file, start, end)`` segments, in order: byte blocks of each .txt /
    .jsonl file, a whole file of another kind, or (file None) the hub dataset or generator. A
    role of None: every 20th document of the segment is held out. A cluster job's partition is
    a contiguous run of segments, so partitions merged give exactly the one-pass result."""
    if synthetic.parse_path(src.path) is not None:
        return [("train", None, 0, None), ("heldout", None, 0, None)]
    out: list[tuple[str | None, Path | None, int, int | None]] = []
    for role, files in source_parts(src):
        if files is None:
            out.append((role, None, 0, None))
            continue
        for f in files:
            if f.suffix in SEEKABLE:
                size = f.stat().st_size
                out += [(role, f, s, min(s + SEGMENT_BYTES, size)) for s in range(0, size, SEGMENT_BYTES)]
            else:
                out.append((role, f, 0, None))
    return out


def segment_documents(src, seed: int, segment, roles=("train", "heldout")) -> Iterator[tuple[str, str]]:
    role, f, start, end = segment
    level = synthetic.parse_path(src.path)
    if level is not None:
        corpus = _synthetic(level, seed)
        if role in roles:
            yield from ((role, d) for d in (corpus.train if role == "train" else corpus.heldout))
        return
    if role is not None and role not in roles:
        return
    docs = hub_documents(src) if f is None else file_documents(f, src.text_field, start, end)
    if role is not None:
        yield from ((role, d) for d in docs)
        return
    for i, d in enumerate(docs):
        r = "heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"
        if r in roles:
            yield r, d


def source_documents(src, seed: int, roles=("train", "heldout"), segments=None) -> Iterator[tuple[str, str]]:
    """``(role, document)`` of a whole source (or of the given segments) in one pass, in order."""
    for seg in source_segments(src) if segments is None else segments:
        yield from segment_documents(src, seed, seg, roles)


def no_documents_error(src, role: str) -> DataError:
    split = not src.heldout and not synthetic.parse_path(src.path) and source_parts(src)[0][0] is None
    why = (f"it has fewer than {HELDOUT_EVERY} documents, and every {HELDOUT_EVERY}th is held out; give it a "
           "heldout: file" if split and role == "heldout" else "no text that is not blank")
    named = src.heldout if src.heldout and role == "heldout" else src.path
    return DataError(f"{named}: no {role} documents ({why})")


def read_source(src, which: str, seed: int, cache_dir: str | None = None) -> list[str]:
    """Documents of one data source as a list (small sources, tests); ``which`` is 'train' or
    'heldout'. The tokenizer and the caches read :func:`source_documents` as a stream."""
    docs = [d for _, d in source_documents(src, seed, roles=(which,))]
    if not docs:
        raise no_documents_error(src, which)
    return docs


@lru_cache(maxsize=16)
def _synthetic(level: int, seed: int):
    return synthetic.generate(level, seed=seed)


def exam_items(src, seed: int) -> list:
    level = synthetic.parse_path(src.path)
    return [] if level is None else list(_synthetic(level, seed).exam)


def source_bytes(src) -> int | None:
    """Bytes of a local source's files (None for a hub dataset or a generator)."""
    if synthetic.parse_path(src.path) is not None:
        return None
    parts = source_parts(src)
    if any(files is None for _, files in parts):
        return None
    return sum(f.stat().st_size for _, files in parts for f in files)


# --------------------------------------------------------------------------- the tokenizer's sample
SAMPLE_WINDOWS = 64  # windows a large source's tokenizer sample is spread over


def sample_documents(src, seed: int, budget: int) -> Iterator[str]:
    """About ``budget`` bytes of a source's training text for the tokenizer. A source that fits
    is read whole (its training documents, in order); a larger local .txt/.jsonl source gives
    ``SAMPLE_WINDOWS`` windows of whole documents spread evenly over its bytes (these may hold
    held-out paragraphs: the tokenizer sees them, the model does not); other large sources give
    their first ``budget`` bytes (a stream has no size to spread over)."""
    size = source_bytes(src)
    parts = [] if size is None else source_parts(src)
    files = [f for role, fs in parts if role != "heldout" for f in fs]
    if size is None or sum(f.stat().st_size for f in files) <= budget or any(f.suffix not in SEEKABLE for f in files):
        for _, d in source_documents(src, seed, roles=("train",)):
            yield d
            budget -= len(d)
            if budget <= 0:
                return
        return
    total = sum(f.stat().st_size for f in files)
    per = max(1, budget // SAMPLE_WINDOWS)
    starts = [total * i // SAMPLE_WINDOWS for i in range(SAMPLE_WINDOWS)]
    bounds, acc = [], 0
    for f in files:
        bounds.append((acc, acc + f.stat().st_size, f))
        acc += f.stat().st_size
    for s in starts:
        left = per
        for lo, hi, f in bounds:
            if hi <= s or left <= 0:
                continue
            for d in file_documents(f, src.text_field, max(0, s - lo)):
                yield d
                left -= len(d.encode("utf-8"))
                if left <= 0:
                    break
            s = hi


__all__ = ["DataError", "check_utf8", "source_parts", "source_documents", "read_source", "exam_items",
           "file_documents", "hub_documents", "source_segments", "segment_documents", "SEGMENT_BYTES", "sample_documents", "source_bytes", "no_documents_error",
           "HELDOUT_EVERY", "TEXT_SUFFIXES", "SEEKABLE"]
