"""Evaluation items as files: multiple-choice exams and minimal pairs (JSONL), read and checked
before any compute (names the file, the line and the reason)."""
from __future__ import annotations

import json
from pathlib import Path

from llmagogy_ds.data.corpus import DataError, check_utf8

# --------------------------------------------------------------------------- input files
_EXAM_FIELDS = ("question", "choices", "answer")
_PAIR_FIELDS = ("sentence_good", "sentence_bad")


def check_exam(rec: dict) -> str | None:
    for f in _EXAM_FIELDS:
        if f not in rec:
            return f"missing field {f!r} (a multiple-choice item needs {', '.join(_EXAM_FIELDS)})"
    if not isinstance(rec["question"], str):
        return f"'question' must be a string, got {type(rec['question']).__name__}"
    ch = rec["choices"]
    if not isinstance(ch, list) or len(ch) < 2:
        return "'choices' must be a list of at least 2 strings"
    for j, c in enumerate(ch):
        if not isinstance(c, str) or not c.strip():
            return f"choice {j} must be a non-empty string, got {c!r}"
    a = rec["answer"]
    if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
        return f"'answer' must be an index into 'choices' (0..{len(ch) - 1}), got {a!r}"
    return None


def check_pair(rec: dict) -> str | None:
    for f in _PAIR_FIELDS:
        if f not in rec:
            return f"missing field {f!r} (a minimal pair needs {', '.join(_PAIR_FIELDS)})"
        if not isinstance(rec[f], str) or not rec[f].strip():
            return f"{f!r} must be a non-empty string, got {rec[f]!r}"
    return None


def _kind_of(rec: dict) -> str | None:
    if "sentence_good" in rec or "sentence_bad" in rec:
        return "pairs"
    if "question" in rec or "choices" in rec:
        return "exam"
    return None


def load_jsonl(path_or_dir, kind: str | None = None) -> list[dict]:
    """Items of a JSONL file, or of every ``*.jsonl`` file under a directory (sorted).

    ``kind`` is ``"exam"`` (``question, choices, answer``), ``"pairs"`` (``sentence_good,
    sentence_bad``) or None (told by each file's first item; one kind for all files).
    Each item gets ``_file``: the file's name without ``.jsonl``. Bad JSON, a missing or
    ill-typed field raise ``DataError`` naming the file and line.
    """
    if kind not in (None, "exam", "pairs"):
        raise ValueError(f"kind must be 'exam', 'pairs' or None, got {kind!r}")
    p = Path(path_or_dir)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
        if not files:
            raise DataError(f"{p}: no .jsonl files in this directory")
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{p}: no such file or directory")
    items: list[dict] = []
    kinds: dict[str, Path] = {}
    for f in files:
        check_utf8(f)
        file_kind = kind
        n_before = len(items)
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{f}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                if file_kind is None:
                    file_kind = _kind_of(rec)
                    if file_kind is None:
                        raise DataError(f"{f}:{lineno}: neither a multiple-choice item ({', '.join(_EXAM_FIELDS)}) "
                                        f"nor a minimal pair ({', '.join(_PAIR_FIELDS)}); fields: {sorted(rec)}")
                err = (check_exam if file_kind == "exam" else check_pair)(rec)
                if err:
                    raise DataError(f"{f}:{lineno}: {err}")
                rec["_file"] = f.name[: -len(".jsonl")] if f.name.endswith(".jsonl") else f.stem
                items.append(rec)
        if len(items) == n_before:
            raise DataError(f"{f}: no items")
        kinds.setdefault(file_kind, f)
    if len(kinds) > 1:
        raise DataError(f"{p}: mixes multiple-choice items ({kinds['exam']}) and minimal pairs ({kinds['pairs']})")
    return items


__all__ = ["load_jsonl", "check_exam", "check_pair"]
