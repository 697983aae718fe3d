"""A run's models scored: find and load a stage's weights, ``evaluate_run`` (held-out sets, built-in
and configured exams, minimal pairs, texts) into ``eval.json``, a baseline scored on the
curriculum's held-out sets, and the plain-text tables of the results."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

import torch

from llmagogy_ds import rundir as RD
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.corpus import DataError
from llmagogy_ds.data.items import load_jsonl
from llmagogy_ds.data.prepare import comparison_data, read_exams, run_tokenizer
from llmagogy_ds.evaluation.evaluate import exam_accuracy
from llmagogy_ds.evaluation.exams import (bits_per_byte, device_of, heldout_bits_per_byte, score_minimal_pairs,
                                          score_multiple_choice)
from llmagogy_ds.fmt import num, pct, text_table


# --------------------------------------------------------------------------- models of a run
def locate_checkpoint(path) -> tuple[Path, Path, int]:
    """``(checkpoint, run_dir, stage index)`` of a run dir (its last finished stage), a stage
    dir ``RUN/stages/NN_name`` or a weights file inside one."""
    p = Path(path)
    if not p.exists():
        raise RD.RunDirError(f"{p}: no such file or directory")
    if p.is_dir() and RD.frozen_config_path(p).exists():
        run_dir = p
        cfg = RD.load_run_config(run_dir)
        done = [s for s in range(len(cfg.stages)) if RD.weights_at(RD.stage_dir(run_dir, cfg, s)) is not None]
        if not done:
            raise RD.RunDirError(f"{run_dir}: no finished stage (no stages/NN_name/model/ yet)")
        return RD.weights_at(RD.stage_dir(run_dir, cfg, done[-1])), run_dir, done[-1]
    # a stage dir, its weights folder (safetensors shards) or a weights file in it (an older run's model.pt)
    if p.is_dir() and not (p / RD.WEIGHTS_INDEX).exists():
        sdir, ckpt = p, RD.weights_at(p) or p / RD.MODEL_DIR
    else:
        sdir, ckpt = p.parent, p
    run_dir = sdir.parent.parent
    if sdir.parent.name != "stages" or not RD.frozen_config_path(run_dir).exists():
        raise RD.RunDirError(f"{p}: not a run directory, a stage directory (RUN/stages/NN_name) or a "
                            f"checkpoint inside one")
    cfg = RD.load_run_config(run_dir)
    idx = [s for s in range(len(cfg.stages)) if RD.stage_dir(run_dir, cfg, s).name == sdir.name]
    if not idx:
        raise RD.RunDirError(f"{sdir}: no such stage in {run_dir}/config.yaml "
                            f"(stages: {', '.join(s.name for s in cfg.stages)})")
    if not ckpt.exists():
        raise RD.RunDirError(f"{sdir}: stage not finished (no {ckpt.name})")
    return ckpt, run_dir, idx[0]


def load_model(path, device=None):
    """``(model, tokenizer, cfg, stage index)`` from a run dir (last finished stage), a stage
    dir or its consolidated fp32 weights (``model/`` shards, or an older run's ``model.pt``). The model is in eval
    mode, on ``device`` (default: cuda when available, else cpu)."""
    ckpt, run_dir, s = locate_checkpoint(path)
    cfg = RD.load_run_config(run_dir)
    tok = run_tokenizer(run_dir)
    model = RD.run_plan(run_dir, cfg, tok.get_vocab_size()).model(s)
    expected = f"{run_dir / RD.CONFIG} (stage {cfg.stages[s].name})"
    model.load_state_dict(load_weights(ckpt, model.state_dict(), expected))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok, cfg, s


def load_weights(path: Path, expected: dict, config: str) -> dict:
    """The tensors of a weights file, checked against the model's names and shapes: one line on
    the first difference instead of torch's list of every mismatch."""
    weights = RD.Weights(path).load()  # safetensors shards or a .pt (a clear error for anything else)
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]

    def shape(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    bad = [k for k in expected if k in weights and shape(weights[k]) != shape(expected[k])]
    if missing or extra or bad:
        if bad:
            k = bad[0]
            diff = f"expected {k} of shape {shape(expected[k])}, found {shape(weights[k])}"
        else:
            diff = f"expected {len(expected)} tensors, found {len(weights)}" + (
                f"; missing {missing[0]}" if missing else "") + (f"; unexpected {extra[0]}" if extra else "")
        n = len(missing) + len(extra) + len(bad)
        raise RD.RunDirError(f"{path}: this model was trained with another config than {config} ({diff}; "
                             f"{n} difference{'s' if n > 1 else ''})")
    return weights


def weights_fingerprint(path) -> str | None:
    """Which model, cheap on any size (no tensor is read): sha256 over its stage's ``result.json``
    (steps, losses, FLOPs: changed by any retraining) and the index of its final weights: every
    tensor's name, shape and dtype (safetensors headers) and every file's size. ``path``: a stage
    dir (None while it has not finished), or its weights (``model/``, an older ``model.pt``)."""
    p = Path(path)
    if not p.exists():
        return None
    if p.is_dir() and not (p / RD.WEIGHTS_INDEX).exists():
        sdir, store = p, RD.weights_at(p, RD.MODEL_DIR)
        if store is None or not (sdir / RD.RESULT).exists():
            return None
    else:
        sdir, store = p.parent, p
    h = hashlib.sha256((sdir / RD.RESULT).read_bytes() if (sdir / RD.RESULT).exists() else b"")
    if store.is_dir():
        from safetensors import safe_open

        entries = []
        for f in sorted(store.glob("part-*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                entries += [(k, list(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype()) for k in sf.keys()]
            entries.append((f.name, f.stat().st_size))
    else:  # an older run's model.pt
        w = RD.Weights(store)
        entries = [(k, list(w.shape(k)), str(w[k].dtype)) for k in sorted(w)] + [(store.name, store.stat().st_size)]
    h.update(json.dumps(sorted(entries, key=str)).encode())
    return h.hexdigest()


def stage_cache(run_dir: Path, stage_name: str) -> D.StageData | None:
    """A stage's packed data under ``RUN/data/<stage>-<fingerprint>`` (the newest complete one)."""
    pat = re.compile(re.escape(stage_name) + r"-[0-9a-f]{16}")
    found = [d for d in RD.data_root(run_dir).glob("*") if pat.fullmatch(d.name) and (d / "meta.json").exists()]
    if not found:
        return None
    return D.StageData.load(max(found, key=lambda d: (d / "meta.json").stat().st_mtime_ns))


def results_path(checkpoint: Path) -> Path:
    """``eval.json`` beside ``model.pt`` (``eval_<stem>.json`` beside another weights file)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / (RD.EVAL if checkpoint.name in (RD.MODEL, RD.MODEL_DIR)
                                else f"eval_{checkpoint.stem}.json")


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
    if write:
        RD.check_writable(results_path(ckpt))  # now, not after every score is computed
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
        items = read_exams(data)
        if items:
            r["exam"] = exam_accuracy(model, tok, items, T, device=device_of(model))
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
        RD.write_atomic(out, res)
    return res


def comparison_eval(run_dir: Path, checkpoint: Path) -> dict[str, dict]:
    """Loss and bits per byte of a baseline model on each curriculum stage's held-out set, plus
    that stage's built-in exam: ``evaluate_run``'s ``heldout`` entries, by stage name."""
    model, tok, _, _ = load_model(checkpoint)
    dev = next(model.parameters()).device
    out = {}
    for name, (st, data) in comparison_data(run_dir, tok, D.file_sha(RD.tokenizer_path(run_dir))).items():
        r = heldout_bits_per_byte(model, tok, data, st.model.seq_len, st.train.eval_tokens)
        items = read_exams(data)
        if items:
            r["exam"] = exam_accuracy(model, tok, items, model.seq_len, device=dev)
        out[name] = r
    return out


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
            rows.append([name, num(r["loss"]), num(r["bpb"]), f"{r['tokens']:,}", f"{r['bytes']:,}",
                         pct((r.get("exam") or {}).get("accuracy"))])
        parts.append(text_table("held-out sets", ["stage", "loss", "bpb", "tokens", "bytes", "exam"], rows))
    if results.get("texts"):
        rows = [[name or "text", num(r["loss"]), num(r["bpb"]), f"{r['tokens']:,}", f"{r['bytes']:,}"]
                for name, r in results["texts"].items()]
        parts.append(text_table("texts", ["file", "loss", "bpb", "tokens", "bytes"], rows))
    if results.get("exams"):
        rows = []
        for name, r in results["exams"].items():
            rows.append([name or "exam", str(r["n"]), pct(r["accuracy"]), pct(r["accuracy_norm"]), pct(r["chance"])])
            for field in ("grade", "subject"):
                for k, g in (r.get(f"by_{field}") or {}).items():
                    rows.append([f"  {field} {k}", str(g["n"]), pct(g["accuracy"]), pct(g["accuracy_norm"]),
                                 pct(g["chance"])])
        parts.append(text_table("multiple-choice exams", ["exam", "n", "acc", "acc (per token)", "chance"], rows))
    if results.get("pairs"):
        rows = []
        for name, r in results["pairs"].items():
            rows.append([name or "pairs", str(r["n"]), pct(r["accuracy"])])
            for key, label in (("by_field", "field"), ("by_term", "term"), ("by_paradigm", "paradigm"),
                               ("by_file", "file")):
                for k, g in (r.get(key) or {}).items():
                    rows.append([f"  {label} {k}", str(g["n"]), pct(g["accuracy"])])
        parts.append(text_table("minimal pairs (chance 50%)", ["set", "n", "accuracy"], rows))
    return "\n\n".join(parts)


__all__ = ["locate_checkpoint", "load_model", "load_weights", "weights_fingerprint", "stage_cache", "results_path",
           "evaluate_run", "comparison_eval", "format_table"]
