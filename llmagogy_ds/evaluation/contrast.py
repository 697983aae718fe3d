"""The based/cringe detector: every document of a source scored under two models of the same
tokenizer, BASE (the pre-final model, trained on the curated stages only) and FULL (after the
full-corpus stage, or any later model), to find what the full corpus taught that the curated
stages did not (the article's sections 5.4-5.6: "eliminate it from training or label it").

**Per token.** A document is tokenized with EOS in front (its first token is predicted from the
same document-start context as in training) and cut into non-overlapping windows of ``T``
predictions (``T``: the smaller ``seq_len`` of the two models), as ``exams.bits_per_byte``
does; both models score the same tokens with the same context. The gain of token ``t`` is
``g_t = log p_FULL(t | ctx) - log p_BASE(t | ctx)`` (nats).

**Per document** (``n`` scored tokens):

* ``gain`` = ``(1/n) Σ g_t``: the mean log-likelihood gain of FULL over BASE per token, the
  default ranking. A document FULL learned to expect and BASE finds unlikely scores high.
* ``gain_sqrt`` = ``Σ g_t / sqrt(n)``, the length-aware variant: were the token gains
  independent with a common spread, the mean over ``n`` tokens would spread as ``1/sqrt(n)``;
  scaling it by ``sqrt(n)`` puts a 10-token and a 10 000-token document on one scale of
  evidence, so that short documents do not fill the top by chance.
* ``span``: the contiguous run of at most ``SPAN_TOKENS`` tokens with the largest summed gain
  (character offsets into the text), and ``top_tokens``: the ``TOP_TOKENS`` tokens with the
  largest gain, of at least ``MIN_TOKEN_GAIN``: the tokens that carry the score.

**Runs.** Rank ``r`` of ``WORLD_SIZE`` (torchrun) scores documents ``i ≡ r (mod WORLD_SIZE)``
and appends one line per document to ``OUT/parts/rank-R.jsonl``; a re-run skips the documents
any part file holds (resumable on a large source, with any number of ranks). Rank 0 then merges
the parts into the ranked ``scores.jsonl`` and, reading the source once more, writes
``flagged.jsonl`` / ``kept.jsonl`` (``--flag-above X``, ``--top K``: records ``{"text",
"contrast"}``, a data source as they are) and the report: ``contrast_report.run_contrast``.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.config.schema import DataSource
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.corpus import EOS
from llmagogy_ds.data.reading import source_bytes, source_documents
from llmagogy_ds.evaluation.results import load_model, locate_checkpoint

SCORES = ("gain", "gain_sqrt")
SPLITS = {"all": ("train", "heldout"), "train": ("train",), "heldout": ("heldout",)}
SPAN_TOKENS = 32  # the longest highlighted span
TOP_TOKENS = 5
MIN_TOKEN_GAIN = 0.1  # nats (FULL 10% likelier): a top token raises the score, it is not noise
PARTS, META, RANKED, FLAGGED, KEPT = "parts", "contrast.json", "scores.jsonl", "flagged.jsonl", "kept.jsonl"
MERGE_TIMEOUT = timedelta(hours=48)  # rank 0 waits at the barrier for the slowest rank's last document


class ContrastError(ValueError):
    """Bad contrast input (models, source, output folder): one line naming what and why."""


# --------------------------------------------------------------------------- per token
@torch.no_grad()
def token_log_likelihoods(model, docs: list[list[int]], seq_len: int, batch: int = 32) -> list[np.ndarray]:
    """``log p(ids[j] | ids[:j])`` for ``j >= 1`` of each id list (its first id is context only),
    in non-overlapping windows of ``seq_len`` predictions, ``batch`` windows per forward."""
    windows = [(d, s) for d, ids in enumerate(docs) for s in range(0, max(0, len(ids) - 1), seq_len)]
    out = [[] for _ in docs]
    dev = next(model.parameters()).device
    for b in range(0, len(windows), batch):
        rows = [docs[d][s: s + seq_len + 1] for d, s in windows[b: b + batch]]
        L = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), L, dtype=torch.long)
        y = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            t = torch.as_tensor(r, dtype=torch.long)
            x[i, : len(r) - 1], y[i, : len(r) - 1] = t[:-1], t[1:]
        ll = -model(x.to(dev), y.to(dev), reduction="none").double().cpu().numpy()  # the model's own loss
        for i, ((d, _), r) in enumerate(zip(windows[b: b + batch], rows)):
            out[d].append(ll[i, : len(r) - 1])
    return [np.concatenate(parts) if parts else np.zeros(0) for parts in out]


def best_span(gains: np.ndarray, longest: int = SPAN_TOKENS) -> tuple[int, int, float]:
    """``(first, end, sum)``: the run of at most ``longest`` consecutive tokens with the largest
    summed gain (the shortest such run when several tie)."""
    cs = np.concatenate([[0.0], np.cumsum(gains)])
    best = (0, 1, float(gains[0]))
    for n in range(1, min(longest, len(gains)) + 1):
        sums = cs[n:] - cs[:-n]
        i = int(np.argmax(sums))
        if sums[i] > best[2] + 1e-12:
            best = (i, i + n, float(sums[i]))
    return best


def document_record(index: int, text: str, offsets: list[tuple[int, int]], base: np.ndarray,
                    full: np.ndarray) -> dict:
    """One document's scores (see the module doc); ``offsets``: the scored tokens' characters."""
    g = full - base
    n = len(g)
    rec = {"index": index, "tokens": n, "chars": len(text)}
    if n == 0:
        return {**rec, "gain": 0.0, "gain_sqrt": 0.0, "base_ll": 0.0, "full_ll": 0.0, "span": None,
                "top_tokens": []}
    a, b, s = best_span(g)
    top = [k for k in np.argsort(-g, kind="stable")[:TOP_TOKENS].tolist() if g[k] >= MIN_TOKEN_GAIN]
    return {**rec, "gain": float(g.mean()), "gain_sqrt": float(g.sum() / math.sqrt(n)),
            "base_ll": float(base.mean()), "full_ll": float(full.mean()),
            "span": {"start": offsets[a][0], "end": offsets[b - 1][1], "tokens": b - a, "gain": s,
                     "text": text[offsets[a][0]: offsets[b - 1][1]]},
            "top_tokens": [{"start": offsets[k][0], "end": offsets[k][1], "gain": float(g[k]),
                            "text": text[offsets[k][0]: offsets[k][1]]} for k in top]}


def encode_documents(tokenizer, texts: list[str]) -> tuple[list, list[list[int]]]:
    """``(encodings, ids)``: each text tokenized, its ids with EOS in front (the document-start
    context of training: the first token is predicted from it)."""
    eos = tokenizer.token_to_id(EOS)
    encs = tokenizer.encode_batch(texts)
    return encs, [[eos, *e.ids] for e in encs]


def score_documents(base, full, tokenizer, docs: list[tuple[int, str]], seq_len: int, batch: int = 32) -> list[dict]:
    """``document_record`` of each ``(index, text)``: one tokenization, both models, same windows."""
    encs, ids = encode_documents(tokenizer, [t for _, t in docs])
    lb = token_log_likelihoods(base, ids, seq_len, batch)
    lf = token_log_likelihoods(full, ids, seq_len, batch)
    return [document_record(i, t, e.offsets, b, f) for (i, t), e, b, f in zip(docs, encs, lb, lf)]


# --------------------------------------------------------------------------- the output folder
def read_parts(out: Path) -> dict[int, dict]:
    """Every scored document of every part file, by index; a torn last line (a killed run) is cut
    off its file so that the next append starts a fresh line."""
    for f in (out / PARTS).glob("rank-*.jsonl"):
        data = f.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(f, "r+b") as h:
                h.truncate(keep)
    done: dict[int, dict] = {}
    for rec in _part_records(out):
        done.setdefault(rec["index"], rec)
    return done


def _part_records(out: Path) -> Iterator[dict]:
    """The records of every part file, in file order; a torn last line (no newline yet: being
    written, or left by a killed run) is not one."""
    for f in sorted((out / PARTS).glob("rank-*.jsonl")):
        data = f.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            yield json.loads(line)


def ranked(records: Iterable[dict], by: str) -> list[dict]:
    """Highest ``by`` first (ties: source order), each with its ``rank`` (1 = most contrast)."""
    out = sorted(records, key=lambda r: (-r[by], r["index"]))
    return [{"rank": k + 1, **r} for k, r in enumerate(out)]


def flagged_indices(rows: list[dict], by: str, flag_above: float | None, top: int | None) -> set[int]:
    """Documents scoring above ``flag_above``, and the ``top`` highest-ranked (``rows``: ranked)."""
    flagged = {r["index"] for r in rows if flag_above is not None and r[by] > flag_above}
    return flagged | {r["index"] for r in rows[: top or 0]}


# --------------------------------------------------------------------------- the command
def world() -> tuple[int, int]:
    """``(rank, world size)`` under torchrun (a gloo group for the merge barrier), else ``(0, 1)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():  # torchrun's env; gloo: the ranks only meet at the merge barrier
        dist.init_process_group("gloo", timeout=MERGE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def rank_device(device=None) -> str:
    """``device``, else this rank's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device or "cpu"


def _identity(base_ckpt: Path, full_ckpt: Path, src: DataSource, split: str, seq_len: int, sha: str) -> dict:
    return {"base": str(Path(base_ckpt).resolve()), "full": str(Path(full_ckpt).resolve()), "source": src.path,
            "heldout": src.heldout, "text_field": src.text_field, "split": split, "source_bytes": source_bytes(src),
            "seq_len": seq_len, "tokenizer_sha256": sha}


def check_inputs(base, full, src: DataSource, split: str) -> tuple[Path, Path, Path, str, int]:
    """``(base checkpoint, full checkpoint, FULL's run dir, tokenizer sha, seq_len)``, every input
    checked before any model is loaded; ``seq_len``: the smaller of the two stages'."""
    if split not in SPLITS:
        raise ContrastError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if src.format != "text":
        raise ContrastError(f"--data: {src.path} is pre-tokenized (format: {src.format}); contrast reads text")
    (bc, brun, bs), (fc, frun, fs) = locate_checkpoint(base), locate_checkpoint(full)
    sha = one_tokenizer({str(base): brun, str(full): frun}, "contrast compares models")
    T = min(RD.load_run_config(brun).stages[bs].model.seq_len, RD.load_run_config(frun).stages[fs].model.seq_len)
    return bc, fc, frun, sha, T


def one_tokenizer(runs: dict[str, Path], why: str, error=ContrastError) -> str:
    """The sha256 of the tokenizer all ``runs`` (by the name the user gave) share, else ``error``
    naming the first run without one or with another (``why``: who needs one tokenizer)."""
    shas = {}
    for name, run in runs.items():
        if not RD.tokenizer_path(run).exists():
            raise error(f"{run}: no {RD.TOKENIZER}")
        shas[name] = D.file_sha(RD.tokenizer_path(run))
    (first, sha), *rest = shas.items()
    for name, other in rest:
        if other != sha:
            raise error(f"{first} and {name}: different tokenizers ({runs[first]}/{RD.TOKENIZER} != "
                        f"{runs[name]}/{RD.TOKENIZER}); {why} of one tokenizer")
    return sha


def open_out(out: Path, ident: dict, rank: int, meta_name: str = META, what: str = "contrast",
             error=ContrastError) -> None:
    """A new folder gets ``meta_name`` (``contrast.json``); an old one must hold this very
    ``what`` (resume), else ``error``."""
    meta = RD.read_json(out / meta_name) if (out / meta_name).exists() else None
    if meta is not None and meta.get("identity") != ident:
        diff = next(k for k in ident if (meta.get("identity") or {}).get(k) != ident[k])
        raise error(f"{out}: holds a {what} of other inputs ({diff}: "
                    f"{(meta.get('identity') or {}).get(diff)!r}, now {ident[diff]!r}); use another --out")
    if meta is None and rank == 0:
        RD.write_atomic(out / meta_name, {"identity": ident, "status": "scoring"})


def score_source(base, full, src: DataSource, out: Path | None = None, *, split: str = "all", batch: int = 32,
                 docs_per_step: int = 256, device=None, progress: bool = True) -> dict:
    """Score every document of ``src`` under BASE and FULL (anything ``load_model`` takes) into
    ``out``'s part files (default ``out``: FULL's run dir ``/contrast``), skipping those scored
    before. Returns what ranking needs: ``rank``, ``out``, ``identity``, ``models``, ``seed``."""
    if batch < 1 or docs_per_step < 1:
        raise ContrastError(f"--batch must be >= 1, got {batch}")
    bc, fc, frun, sha, T = check_inputs(base, full, src, split)
    out = Path(out) if out is not None else frun / RD.CONTRAST
    rank, _ = world()
    ident = _identity(bc, fc, src, split, T, sha)
    open_out(out, ident, rank)  # before the models are loaded
    device = rank_device(device)
    bm, tok, bcfg, bs = load_model(bc, device)
    fm, _, fcfg, fs = load_model(fc, device)
    score_into_parts(out, src, bcfg.run.seed, SPLITS[split], lambda docs: score_documents(bm, fm, tok, docs, T, batch),
                     docs_per_step, "contrast", progress)
    models = {"base": {"checkpoint": str(bc), "stage": bcfg.stages[bs].name},
              "full": {"checkpoint": str(fc), "stage": fcfg.stages[fs].name}}
    return {"rank": rank, "out": out, "identity": ident, "models": models, "seed": bcfg.run.seed}


def score_into_parts(out: Path, src: DataSource, seed: int, roles: tuple[str, ...], score, docs_per_step: int,
                     desc: str, progress: bool = True) -> None:
    """This rank's documents of ``src`` (``i ≡ rank mod world``, not in any part file yet), read
    as a stream and ``score``d ``docs_per_step`` at a time (``score([(index, text)]) -> records``,
    each with its ``index``), appended to ``out/parts/rank-R.jsonl``; every rank is done on return."""
    rank, n_ranks = world()
    if rank == 0:
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        read_parts(out)  # torn last lines cut before any rank appends
    if n_ranks > 1:
        dist.barrier()
    done = _read_done(out)
    from tqdm import tqdm

    bar = tqdm(desc=f"{desc} (rank {rank})" if n_ranks > 1 else desc, unit=" doc", disable=not progress or None)
    mine = ((i, t) for i, (_, t) in enumerate(source_documents(src, seed, roles=roles))
            if i % n_ranks == rank and i not in done)
    with open(out / PARTS / f"rank-{rank:05d}.jsonl", "a", encoding="utf-8") as part:
        pending: list[tuple[int, str]] = []
        for doc in itertools.chain(mine, [None]):  # a stream
            if doc is not None:
                pending.append(doc)
            if pending and (doc is None or len(pending) >= docs_per_step):
                part.write("".join(json.dumps(r) + "\n" for r in score(pending)))
                part.flush()  # what is on disk is done: a killed run resumes after it
                bar.update(len(pending))
                pending = []
    bar.close()
    if n_ranks > 1:
        dist.barrier()  # every rank's part complete


def _read_done(out: Path) -> set[int]:
    """The indices already scored, read without cutting any file (rank 0 has cut torn lines)."""
    return {rec["index"] for rec in _part_records(out)}


def stream_documents(src: DataSource, seed: int, split: str) -> Iterator[tuple[int, str]]:
    """``(index, text)`` of the source, in the order the indices were given."""
    yield from ((i, t) for i, (_, t) in enumerate(source_documents(src, seed, roles=SPLITS[split])))


__all__ = ["ContrastError", "token_log_likelihoods", "best_span", "document_record", "score_documents", "read_parts",
           "ranked", "flagged_indices", "score_source", "stream_documents", "check_inputs", "SCORES", "SPLITS",
           "encode_documents", "world", "rank_device", "one_tokenizer", "open_out", "score_into_parts"]
