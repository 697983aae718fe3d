"""The method's evidence: held-out bits per byte, multiple-choice exams and minimal pairs.

Everything here scores a causal LM by log-likelihood; a "model" is anything that maps token
ids ``[B, T]`` to logits ``[B, T, V]`` (``model.GPT`` or a stand-in), so the scores can be
compared across stages, shapes and tokenizers.

* **Bits per byte** (``bits_per_byte``): the text is split into documents at blank lines
  (as ``.txt`` training sources are), tokenized and joined like ``data.pack`` does — every
  document is followed by EOS — and one EOS is put in front, so the first token of the
  first document is predicted from the same document-start context as the others. The
  stream is cut into *non-overlapping* windows of ``seq_len`` predictions (window ``i``
  reads tokens ``i·T .. i·T+T-1`` and predicts ``i·T+1 .. i·T+T``; the last one may be
  shorter), so each token is scored once, with between 1 and ``seq_len`` tokens of
  context. ``bpb = Σ NLL (nats) / (ln 2 · bytes)`` where bytes counts the UTF-8 bytes of the
  documents (the text whose tokens were scored); the EOS tokens are scored but count as
  zero bytes. The held-out sets of a run's stages are scored on exactly the windows the
  trainer evaluates (``data.heldout_windows``), so the loss equals the trainer's held-out
  loss; their bytes are those of the scored tokens, counted exactly per token for
  byte-level BPE (else by decoding).
* **Multiple choice** (``score_multiple_choice``): a choice's score is the log-likelihood of
  its tokens after the question: the text is ``question + " " + choice`` (no space when the
  choice starts or the question ends with whitespace), preceded by EOS; the scored tokens
  are those that end after the question's last character (tokenizer offsets, as in
  ``evaluate.encode_item``: a token straddling the boundary belongs to the choice). The
  prediction is the arg-max of the sum (``accuracy``) and of the mean per token
  (``accuracy_norm``); ties go to the first choice. ``chance`` is the mean of
  ``1 / len(choices)``.
* **Minimal pairs** (``score_minimal_pairs``, BLiMP / Zorro): a pair is right when
  ``log P(good) > log P(bad)`` (strictly), each the full-sentence log-likelihood with EOS
  as the context of the first token.

Sequences longer than ``seq_len + 1`` tokens keep their last ``seq_len + 1`` tokens (the
context is cut on the left); the ``truncated`` count says how many were cut.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import curriculum as K
from . import data as D
from .data import EOS, DataError
from .evaluate import exam_accuracy

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- core scoring
def _device(model) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


class _EvalMode:
    """``model.eval()`` for the block, the previous mode restored after it."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def score_sequences(model, seqs: Sequence[tuple[Sequence[int], int]], seq_len: int,
                    batch: int = 32) -> list[tuple[float, int, bool]]:
    """Log-likelihood of the tail of each sequence.

    For each ``(ids, first)``: ``(Σ_{j ≥ first} log p(ids[j] | ids[:j]), number of scored
    tokens, truncated)``. A sequence longer than ``seq_len + 1`` keeps its last ``seq_len + 1``
    tokens (tail tokens that lose all their context are dropped from the sum). Sequences
    are batched by length, padded on the right (causal: the padding is never attended to).
    """
    out: list[tuple[float, int, bool] | None] = [None] * len(seqs)
    dev = _device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    with _EvalMode(model):
        for b in range(0, len(order), batch):
            rows = []
            for i in order[b: b + batch]:
                ids, first = list(seqs[i][0]), int(seqs[i][1])
                cut = max(0, len(ids) - (seq_len + 1))
                rows.append((i, ids[cut:], max(1, first - cut), cut > 0))
            L = max(1, max(len(ids) for _, ids, _, _ in rows) - 1)
            x = torch.zeros(len(rows), L, dtype=torch.long)
            y = torch.full((len(rows), L), -100, dtype=torch.long)
            for r, (_, ids, a, _) in enumerate(rows):
                if len(ids) < 2:
                    continue
                t = torch.as_tensor(ids, dtype=torch.long)
                x[r, : len(ids) - 1] = t[:-1]
                y[r, a - 1: len(ids) - 1] = t[a:]
            logits = model(x.to(dev))
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1).to(dev),
                                  ignore_index=-100, reduction="none").view(len(rows), L)
            sums = (-nll.double().sum(1)).cpu().tolist()
            counts = (y != -100).sum(1).tolist()
            for r, (i, _, _, trunc) in enumerate(rows):
                out[i] = (float(sums[r]), int(counts[r]), trunc)
    return out  # type: ignore[return-value]


def _stream_windows(stream: Sequence[int], seq_len: int, n_windows: int | None = None) -> list[tuple[list[int], int]]:
    """Non-overlapping windows of ``seq_len`` predictions: targets ``stream[1 : n·T + 1]``."""
    n = len(stream)
    starts = range(0, max(0, n - 1), seq_len)
    if n_windows is not None:
        starts = starts[:n_windows]
    return [(list(map(int, stream[s: s + seq_len + 1])), 1) for s in starts]


def _sum_windows(model, windows, seq_len: int, batch: int) -> tuple[float, int]:
    scores = score_sequences(model, windows, seq_len, batch)
    return -sum(s for s, _, _ in scores), sum(n for _, n, _ in scores)


# --------------------------------------------------------------------------- bytes
def _byte_table(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of every token id, exact for byte-level BPE (None for other tokenizers)."""
    from tokenizers import decoders, pre_tokenizers

    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # one character per byte
    added = tokenizer.get_added_tokens_decoder()
    table = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for i in range(len(table)):
        if i in added:
            table[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            continue
        tok = tokenizer.id_to_token(i)
        if tok is None:
            continue
        if not set(tok) <= alphabet:
            return None
        table[i] = len(tok)
    return table


def count_bytes(tokenizer, ids: Sequence[int], table: np.ndarray | None = None) -> int:
    """UTF-8 bytes of the text that token ``ids`` stand for; special tokens (EOS) count 0.

    Byte-level BPE: the exact sum per token (a slice may cut a character in two). Other
    tokenizers: the runs between special tokens are decoded.
    """
    table = _byte_table(tokenizer) if table is None else table
    ids = np.asarray(ids, dtype=np.int64)
    if table is not None:
        return int(table[ids].sum())
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    total, run = 0, []
    for i in [*ids.tolist(), None]:
        if i is None or i in special:
            if run:
                total += len(tokenizer.decode(run).encode("utf-8"))
            run = []
        else:
            run.append(i)
    return total


# --------------------------------------------------------------------------- bits per byte
def split_documents(text: str) -> list[str]:
    """Documents of a text: paragraphs separated by blank lines, stripped, empty ones dropped."""
    return [d.strip() for d in re.split(r"\n[^\S\n]*\n", text) if d.strip()]


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """EOS, then every document followed by EOS (``data.pack`` with a leading EOS)."""
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS} token")
    ids = [eos]
    for enc in tokenizer.encode_batch(docs) if docs else []:
        ids += enc.ids + [eos]
    return np.asarray(ids, dtype=np.int64)


def _bpb(nll: float, tokens: int, nbytes: int) -> dict:
    return {"loss": nll / tokens if tokens else math.nan, "bpb": nll / (LN2 * nbytes) if nbytes else math.nan,
            "tokens": int(tokens), "bytes": int(nbytes)}


def bits_per_byte(model, tokenizer, text: str, seq_len: int, batch: int = 16) -> dict:
    """Held-out loss (nats/token) and bits per byte of ``model`` on ``text``.

    Keys: ``loss``, ``bpb``, ``tokens`` (scored tokens, EOS included), ``bytes`` (UTF-8
    bytes of the documents), ``documents``, ``windows``. See the module doc for the windows.
    """
    docs = split_documents(text)
    windows = _stream_windows(token_stream(tokenizer, docs), seq_len)
    nll, n = _sum_windows(model, windows, seq_len, batch)
    out = _bpb(nll, n, sum(len(d.encode("utf-8")) for d in docs))
    out.update(documents=len(docs), windows=len(windows))
    return out


def heldout_bits_per_byte(model, tokenizer, stage_data: D.StageData, seq_len: int, max_tokens: int,
                          batch: int = 16) -> dict:
    """Loss and bpb on a stage's packed held-out streams, per source and over all of them.

    The windows are those of ``data.heldout_windows`` (split over sources by weight), so
    the loss is the trainer's held-out loss; a source shorter than one window is scored
    whole. Bytes are those of the scored (target) tokens.
    """
    table = _byte_table(tokenizer)
    weights = stage_data.weights
    sources, nll_all, tok_all, bytes_all = [], 0.0, 0, 0
    for k, w in enumerate(weights):
        s = stage_data.stream(k, "heldout")
        n = min((len(s) - 1) // seq_len, max(1, int(max_tokens * w / sum(weights)) // seq_len))
        windows = _stream_windows(s, seq_len, max(1, n))
        nll, ntok = _sum_windows(model, windows, seq_len, batch)
        nbytes = sum(count_bytes(tokenizer, ids[1:], table) for ids, _ in windows)
        sources.append({"path": stage_data.sources[k]["path"], **_bpb(nll, ntok, nbytes)})
        nll_all, tok_all, bytes_all = nll_all + nll, tok_all + ntok, bytes_all + nbytes
    return {**_bpb(nll_all, tok_all, bytes_all), "sources": sources}


# --------------------------------------------------------------------------- input files
_EXAM_FIELDS = ("question", "choices", "answer")
_PAIR_FIELDS = ("sentence_good", "sentence_bad")


def _check_exam(rec: dict) -> str | None:
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


def _check_pair(rec: dict) -> str | None:
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
        D.check_utf8(f)
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
                err = (_check_exam if file_kind == "exam" else _check_pair)(rec)
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


# --------------------------------------------------------------------------- grouping
def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _groups(items: list[dict], field: str) -> dict | None:
    """``{str(value): [indices]}`` of a field present in some item (missing: '(none)')."""
    if not any(field in it for it in items):
        return None
    idx: dict = defaultdict(list)
    for i, it in enumerate(items):
        idx[it.get(field, "(none)")].append(i)
    return {str(k): idx[k] for k in sorted(idx, key=_sort_key)}


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


# --------------------------------------------------------------------------- multiple choice
def _split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Ids of EOS + context + continuation and the index of the first continuation token."""
    text = context + continuation
    enc = tokenizer.encode(text)
    first = next((i for i, (_, e) in enumerate(enc.offsets) if e > len(context)), len(enc.ids))
    return [tokenizer.token_to_id(EOS)] + enc.ids, first + 1


def choice_text(question: str, choice: str) -> str:
    """The continuation scored for a choice: ``" " + choice`` unless whitespace is already there."""
    return choice if not question or choice[:1].isspace() or question[-1:].isspace() else " " + choice


def score_multiple_choice(model, tokenizer, items: list[dict], seq_len: int, batch: int = 32,
                          details: bool = False) -> dict:
    """Accuracy of the arg-max choice by summed and by per-token mean log-likelihood.

    Returns ``n, accuracy, accuracy_norm, chance, truncated`` and, when items carry them,
    ``by_grade`` / ``by_subject`` (``{value: {n, accuracy, accuracy_norm, chance}}``);
    ``details=True`` adds ``items``: per item the choices' ``loglik`` (sum), ``tokens``,
    ``pred``, ``pred_norm`` and ``answer``.
    """
    for i, it in enumerate(items):
        err = _check_exam(it)
        if err:
            raise DataError(f"item {i}: {err}")
    seqs, owner = [], []
    for i, it in enumerate(items):
        for c in it["choices"]:
            seqs.append(_split_continuation(tokenizer, it["question"], choice_text(it["question"], c)))
            owner.append(i)
    scores = score_sequences(model, seqs, seq_len, batch)
    per_item: list[dict] = [{"loglik": [], "tokens": [], "truncated": False} for _ in items]
    for i, (s, n, trunc) in zip(owner, scores):
        per_item[i]["loglik"].append(s)
        per_item[i]["tokens"].append(n)
        per_item[i]["truncated"] |= trunc
    correct, correct_norm, chance = [], [], []
    for it, r in zip(items, per_item):
        mean = [s / n if n else -math.inf for s, n in zip(r["loglik"], r["tokens"])]
        r["pred"], r["pred_norm"], r["answer"] = int(np.argmax(r["loglik"])), int(np.argmax(mean)), it["answer"]
        correct.append(r["pred"] == it["answer"])
        correct_norm.append(r["pred_norm"] == it["answer"])
        chance.append(1.0 / len(it["choices"]))

    def summary(idx) -> dict:
        return {"n": len(idx), "accuracy": _mean([correct[i] for i in idx]),
                "accuracy_norm": _mean([correct_norm[i] for i in idx]), "chance": _mean([chance[i] for i in idx])}

    out = {**summary(range(len(items))), "truncated": sum(r["truncated"] for r in per_item)}
    for field in ("grade", "subject"):
        g = _groups(items, field)
        if g is not None:
            out[f"by_{field}"] = {k: summary(v) for k, v in g.items()}
    if details:
        out["items"] = per_item
    return out


# --------------------------------------------------------------------------- minimal pairs
def score_minimal_pairs(model, tokenizer, pairs: list[dict], seq_len: int, batch: int = 32,
                        details: bool = False) -> dict:
    """Fraction of pairs with log P(good) > log P(bad) (full sentences, EOS as context).

    Returns ``n, accuracy, truncated`` and the groups present: ``by_paradigm`` (``UID`` of
    BLiMP, or ``paradigm`` of Zorro), ``by_term`` (``linguistics_term``), ``by_field``
    (BLiMP's ``field``), ``by_file`` (when the pairs come from several files);
    each ``{name: {n, accuracy}}``. ``details=True`` adds ``items``: ``logp_good, logp_bad``.
    """
    for i, p in enumerate(pairs):
        err = _check_pair(p)
        if err:
            raise DataError(f"pair {i}: {err}")
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS} token")
    sentences = [s for p in pairs for s in (p["sentence_good"], p["sentence_bad"])]
    encs = tokenizer.encode_batch(sentences) if sentences else []
    scores = score_sequences(model, [([eos] + e.ids, 1) for e in encs], seq_len, batch)
    good, bad = scores[0::2], scores[1::2]
    correct = [g[0] > b[0] for g, b in zip(good, bad)]

    def summary(idx) -> dict:
        return {"n": len(idx), "accuracy": _mean([correct[i] for i in idx])}

    out = {**summary(range(len(pairs))), "truncated": sum(g[2] or b[2] for g, b in zip(good, bad))}
    tagged = [{**p, "_paradigm": p.get("UID", p.get("paradigm"))} if ("UID" in p or "paradigm" in p) else p
              for p in pairs]
    for name, field in (("by_paradigm", "_paradigm"), ("by_term", "linguistics_term"), ("by_field", "field")):
        g = _groups(tagged, field)
        if g is not None:
            out[name] = {k: summary(v) for k, v in g.items()}
    files = _groups(pairs, "_file")
    if files is not None and len(files) > 1:
        out["by_file"] = {k: summary(v) for k, v in files.items()}
    if details:
        out["items"] = [{"logp_good": g[0], "logp_bad": b[0]} for g, b in zip(good, bad)]
    return out


# --------------------------------------------------------------------------- models of a run
def locate_checkpoint(path) -> tuple[Path, Path, int]:
    """``(checkpoint, run_dir, stage index)`` of a run dir (its last finished stage), a stage
    dir ``RUN/stages/NN_name`` or a weights file inside one."""
    p = Path(path)
    if not p.exists():
        raise K.RunDirError(f"{p}: no such file or directory")
    if p.is_dir() and K.frozen_config_path(p).exists():
        run_dir = p
        cfg = K.load_run_config(run_dir)
        done = [s for s in range(len(cfg.stages)) if (K.stage_dir(run_dir, cfg, s) / "model.pt").exists()]
        if not done:
            raise K.RunDirError(f"{run_dir}: no finished stage (no stages/NN_name/model.pt yet)")
        return K.stage_dir(run_dir, cfg, done[-1]) / "model.pt", run_dir, done[-1]
    sdir, ckpt = (p, p / "model.pt") if p.is_dir() else (p.parent, p)
    run_dir = sdir.parent.parent
    if sdir.parent.name != "stages" or not K.frozen_config_path(run_dir).exists():
        raise K.RunDirError(f"{p}: not a run directory, a stage directory (RUN/stages/NN_name) or a "
                            f"checkpoint inside one")
    cfg = K.load_run_config(run_dir)
    idx = [s for s in range(len(cfg.stages)) if K.stage_dir(run_dir, cfg, s).name == sdir.name]
    if not idx:
        raise K.RunDirError(f"{sdir}: no such stage in {run_dir}/config.yaml "
                            f"(stages: {', '.join(s.name for s in cfg.stages)})")
    if not ckpt.exists():
        raise K.RunDirError(f"{sdir}: stage not finished (no {ckpt.name})")
    return ckpt, run_dir, idx[0]


def load_model(path, device=None):
    """``(model, tokenizer, cfg, stage index)`` from a run dir (last finished stage), a stage
    dir or a ``model.pt`` (consolidated fp32 weights) inside a run dir. The model is in eval
    mode, on ``device`` (default: cuda when available, else cpu)."""
    ckpt, run_dir, s = locate_checkpoint(path)
    cfg = K.load_run_config(run_dir)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.exists():
        raise K.RunDirError(f"{run_dir}: no tokenizer.json")
    tok = D.load_tokenizer(tok_path)
    model = K.Plan(cfg, tok.get_vocab_size()).model(s)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok, cfg, s


def stage_cache(run_dir: Path, stage_name: str) -> D.StageData | None:
    """A stage's packed data under ``RUN/data/<stage>-<fingerprint>`` (the newest complete one)."""
    pat = re.compile(re.escape(stage_name) + r"-[0-9a-f]{16}")
    found = [d for d in (Path(run_dir) / "data").glob("*") if pat.fullmatch(d.name) and (d / "meta.json").exists()]
    if not found:
        return None
    return D.StageData.load(max(found, key=lambda d: (d / "meta.json").stat().st_mtime_ns))


def results_path(checkpoint: Path) -> Path:
    """``eval.json`` beside ``model.pt`` (``eval_<stem>.json`` beside another weights file)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / ("eval.json" if checkpoint.name == "model.pt" else f"eval_{checkpoint.stem}.json")


def evaluate_run(run_dir, exams: Iterable = (), pairs: Iterable = (), texts: Iterable = (), *,
                 heldout_tokens: int | None = None, batch: int = 16, device=None, write: bool = True) -> dict:
    """Evaluate a run's model (``run_dir``: anything ``load_model`` accepts) and write ``eval.json``.

    * ``heldout``: per stage of the curriculum, loss and bpb on its held-out set (at most
      ``heldout_tokens`` tokens, default the stage's ``train.eval_tokens``), per source and
      in all, plus the stage's built-in exam (teacher-forced exact match) when it has one;
    * ``exams`` / ``pairs`` / ``texts``: ``{path: score}`` for the given JSONL files or
      directories (multiple choice, minimal pairs) and text files (bits per byte).

    Every input file is read and checked before any scoring. The results (also returned)
    overwrite ``results_path(checkpoint)`` when ``write``.
    """
    ckpt, run, s = locate_checkpoint(run_dir)
    exam_sets = {str(p): load_jsonl(p, kind="exam") for p in exams}
    pair_sets = {str(p): load_jsonl(p, kind="pairs") for p in pairs}
    text_sets = {}
    for p in texts:
        p = Path(p)
        if not p.is_file():
            raise DataError(f"{p}: no such text file")
        D.check_utf8(p)
        text_sets[str(p)] = p.read_text(encoding="utf-8")
    model, tok, cfg, s = load_model(ckpt, device)
    T = model.seq_len
    res = {"checkpoint": str(ckpt), "run_dir": str(run), "stage": cfg.stages[s].name, "stage_index": s,
           "n_params": sum(p.numel() for p in model.parameters()), "seq_len": T,
           "heldout": {}, "exams": {}, "pairs": {}, "texts": {}}
    for k, st in enumerate(cfg.stages):
        data = stage_cache(run, st.name)
        if data is None:
            res["heldout"][st.name] = {"missing": f"no data cache {run}/data/{st.name}-*/meta.json"}
            continue
        r = heldout_bits_per_byte(model, tok, data, T, heldout_tokens or st.train.eval_tokens, batch)
        items = K.read_exams(data)
        if items:
            r["exam"] = exam_accuracy(model, tok, items, T, device=_device(model))
        res["heldout"][st.name] = r
    for name, text in text_sets.items():
        res["texts"][name] = bits_per_byte(model, tok, text, T, batch)
    for name, items in exam_sets.items():
        res["exams"][name] = score_multiple_choice(model, tok, items, T, batch)
    for name, items in pair_sets.items():
        res["pairs"][name] = score_minimal_pairs(model, tok, items, T, batch)
    if write:
        out = results_path(ckpt)
        res["output"] = str(out)
        write_results(res, out)
    return res


# --------------------------------------------------------------------------- output
def jsonable(x):
    """Strict-JSON-ready copy: NaN/inf → None, numpy scalars and paths → Python."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None  # strict JSON has no NaN/inf
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_results(results: dict, path) -> Path:
    """Write results as strict JSON (NaN → null), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _f(v, fmt="{:.4f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _pct(v) -> str:
    return _f(v, "{:.1%}")


def _table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_table(results: dict) -> str:
    """Plain-text tables of ``evaluate_run``'s results (or of one scorer's result)."""
    if "heldout" not in results:  # a single result: put it in the section it belongs to
        key = "texts" if "bpb" in results else "exams" if "chance" in results else "pairs"
        results = {key: {"": results}}
    parts = []
    if "checkpoint" in results:
        parts.append(f"model: {results['checkpoint']} (stage {results['stage_index']} {results['stage']}, "
                     f"{results['n_params']:,} parameters, seq_len {results['seq_len']})")
    held = results.get("heldout") or {}
    if held:
        rows = []
        for name, r in held.items():
            if "missing" in r:
                rows.append([name, "-", "-", "-", "-", "-"])
                continue
            rows.append([name, _f(r["loss"]), _f(r["bpb"]), f"{r['tokens']:,}", f"{r['bytes']:,}",
                         _pct((r.get("exam") or {}).get("accuracy"))])
        parts.append(_table("held-out sets", ["stage", "loss", "bpb", "tokens", "bytes", "exam"], rows))
    if results.get("texts"):
        rows = [[name or "text", _f(r["loss"]), _f(r["bpb"]), f"{r['tokens']:,}", f"{r['bytes']:,}"]
                for name, r in results["texts"].items()]
        parts.append(_table("texts", ["file", "loss", "bpb", "tokens", "bytes"], rows))
    if results.get("exams"):
        rows = []
        for name, r in results["exams"].items():
            rows.append([name or "exam", str(r["n"]), _pct(r["accuracy"]), _pct(r["accuracy_norm"]), _pct(r["chance"])])
            for field in ("grade", "subject"):
                for k, g in (r.get(f"by_{field}") or {}).items():
                    rows.append([f"  {field} {k}", str(g["n"]), _pct(g["accuracy"]), _pct(g["accuracy_norm"]),
                                 _pct(g["chance"])])
        parts.append(_table("multiple-choice exams", ["exam", "n", "acc", "acc (per token)", "chance"], rows))
    if results.get("pairs"):
        rows = []
        for name, r in results["pairs"].items():
            rows.append([name or "pairs", str(r["n"]), _pct(r["accuracy"])])
            for key, label in (("by_field", "field"), ("by_term", "term"), ("by_paradigm", "paradigm"),
                               ("by_file", "file")):
                for k, g in (r.get(key) or {}).items():
                    rows.append([f"  {label} {k}", str(g["n"]), _pct(g["accuracy"])])
        parts.append(_table("minimal pairs (chance 50%)", ["set", "n", "accuracy"], rows))
    return "\n\n".join(parts)


__all__ = ["bits_per_byte", "heldout_bits_per_byte", "score_multiple_choice", "score_minimal_pairs",
           "score_sequences", "count_bytes", "split_documents", "token_stream", "choice_text", "load_jsonl",
           "locate_checkpoint", "load_model", "stage_cache", "results_path", "evaluate_run", "write_results",
           "format_table"]
