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
  ``1 / len(choices)``. lm-evaluation-harness's names are there too: ``acc`` (= ``accuracy``)
  and ``acc_norm``, the arg-max of the sum divided by the choice's length in characters
  (lm-eval's normalisation; ours, ``accuracy_norm``, is per token).
* **Minimal pairs** (``score_minimal_pairs``, BLiMP / Zorro): a pair is right when
  ``log P(good) > log P(bad)`` (strictly), each the full-sentence log-likelihood with EOS
  as the context of the first token.

Sequences longer than ``seq_len + 1`` tokens keep their last ``seq_len + 1`` tokens (the
context is cut on the left); the ``truncated`` count says how many were cut.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.corpus import EOS, DataError
from llmagogy_ds.data.items import check_exam, check_pair

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- core scoring
def device_of(model) -> torch.device:
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
    dev = device_of(model)
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

    Returns ``n, accuracy, accuracy_norm, acc, acc_norm, chance, truncated`` (``acc`` and
    ``acc_norm``: lm-eval's, module doc) and, when items carry them, ``by_grade`` /
    ``by_subject`` (``{value: {n, accuracy, accuracy_norm, chance}}``); ``details=True`` adds
    ``items``: per item the choices' ``loglik`` (sum), ``tokens``, ``pred``, ``pred_norm``,
    ``pred_chars`` (lm-eval's acc_norm pick) and ``answer``.
    """
    for i, it in enumerate(items):
        err = check_exam(it)
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
    correct, correct_norm, correct_chars, chance = [], [], [], []
    for it, r in zip(items, per_item):
        mean = [s / n if n else -math.inf for s, n in zip(r["loglik"], r["tokens"])]
        per_char = [s / max(1, len(c)) for s, c in zip(r["loglik"], it["choices"])]  # lm-eval's acc_norm
        r["pred"], r["pred_norm"], r["answer"] = int(np.argmax(r["loglik"])), int(np.argmax(mean)), it["answer"]
        r["pred_chars"] = int(np.argmax(per_char))
        correct.append(r["pred"] == it["answer"])
        correct_norm.append(r["pred_norm"] == it["answer"])
        correct_chars.append(r["pred_chars"] == it["answer"])
        chance.append(1.0 / len(it["choices"]))

    def summary(idx) -> dict:
        return {"n": len(idx), "accuracy": _mean([correct[i] for i in idx]),
                "accuracy_norm": _mean([correct_norm[i] for i in idx]), "chance": _mean([chance[i] for i in idx])}

    out = {**summary(range(len(items))), "truncated": sum(r["truncated"] for r in per_item)}
    out.update(acc=out["accuracy"], acc_norm=_mean(correct_chars))  # lm-eval's names and normalisation
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
        err = check_pair(p)
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


__all__ = ["bits_per_byte", "heldout_bits_per_byte", "score_multiple_choice", "score_minimal_pairs",
           "score_sequences", "count_bytes", "split_documents", "token_stream", "choice_text"]
