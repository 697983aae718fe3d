"""``llmagogy size-search``: choose a stage's depth D and width W so that it cannot memorize
its corpus (the article's section 3).

A *ladder* of (D, W) candidates is trained from scratch on one stage's corpus, each for the
same budget, in this process (plain PyTorch AdamW on the project's own model, data pipeline
and lr schedule, stepped by the trainer's own ``train_step``; no DeepSpeed). For each
candidate the search reports parameters, FLOPs, the final loss on a fixed set of *training* windows, the held-out loss on the stage's fixed
held-out windows (both measured by ``evaluate.heldout_loss``, at the end), the gap
(held-out - train: what the model memorized) and the wall time.

Default ladder, from the stage's own shape (D, W): (D/2, W/2), (D, W/2), (D, W), (2D, W),
(2D, 2W) -- each rung doubles depth or width, so parameters grow along it. Heads are
W / head_dim; the FFN keeps the stage's ffn/hidden ratio. ``--ladder "D,W;D,W[,FFN];..."``
gives another.

Default budget: the stage's own (``train.tokens``, or ``train.epochs`` of its training
text) for every candidate. It is the full stage, not a fraction, because memorization
grows with the epochs a model sees: a shorter run would hide the gap the real stage would
open. ``--budget`` takes tokens (``2e6``, ``500k``), a fraction of the stage's own
(``0.25x``), or FLOPs per candidate (``3e12flops``: compute-matched, so smaller candidates
see more tokens). The batch, sequence length, optimizer and schedule are the stage's.

Recommendation: a candidate *memorizes* when its gap exceeds
``max(max_gap, max_gap_rel * held-out loss)`` (defaults 0.05 nats and 5 %). Among those that
do not, the best held-out loss is found, and the smallest candidate (parameters) whose
held-out loss is within ``tolerance`` (relative, default 5 %) of it is recommended. When
every candidate memorizes, the smallest-gap one is named with a warning.

``--write`` puts the recommended layers/hidden/heads/ffn into that stage of the config and
writes ``<config>.sized.yaml`` next to the config (same directory, so relative data paths
mean the same); the user's file is never touched. The edit is made in the text, so
comments and layout survive; the result is checked to load and to differ from the original
only in those four keys (``sized_config.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import ConfigError, CurriculumConfig, ModelConfig, StageConfig, load_config
from llmagogy_ds.evidence import plots as P
from llmagogy_ds.evidence.sized_config import check_writable, write_sized_config
from llmagogy_ds.model.layout import Shape, initial_layout

MODEL_KEYS = ("layers", "hidden", "heads", "ffn")


# --------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate(Shape):
    """A model shape on the ladder (layers, hidden, heads, ffn)."""

    @property
    def label(self) -> str:
        return f"{self.layers}x{self.hidden}"


def _check_stage(cfg: CurriculumConfig, stage_name: str) -> None:
    names = [s.name for s in cfg.stages]
    if stage_name not in names:
        raise ConfigError(f"--stage: no stage named {stage_name!r} (stages: {', '.join(names)})")


def _ffn_for(model: ModelConfig, hidden: int) -> int:
    """The stage's ffn/hidden ratio at another width (the stage's own ffn at its own width)."""
    return model.ffn if hidden == model.hidden else max(1, round(model.ffn * hidden / model.hidden))


def default_ladder(model: ModelConfig) -> list[Candidate]:
    d, w, hd = model.layers, model.hidden, model.head_dim
    half_w = max(hd, (w // 2) // hd * hd)  # a whole number of heads, at least one
    rungs = [(max(1, d // 2), half_w), (d, half_w), (d, w), (2 * d, w), (2 * d, 2 * w)]
    out: list[Candidate] = []
    for layers, hidden in rungs:
        c = Candidate(layers, hidden, hidden // hd, _ffn_for(model, hidden))
        if c not in out:  # D = 1 or W = head_dim make rungs coincide
            out.append(c)
    return out


def parse_ladder(text: str, model: ModelConfig) -> list[Candidate]:
    """``"D,W;D,W,FFN;..."`` (``x`` also separates D and W) -> candidates, every error at once."""
    errors, out = [], []
    items = [t.strip() for t in text.split(";") if t.strip()]
    if not items:
        raise ConfigError("--ladder: no candidates (expected 'D,W;D,W;...', e.g. '2,64;4,128')")
    for i, item in enumerate(items):
        where = f"--ladder[{i}] {item!r}"
        parts = [p.strip() for p in re.split(r"[,x]", item)]
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[-+]?\d+", p) for p in parts):
            errors.append(f"{where}: expected D,W or D,W,FFN (integers)")
            continue
        layers, hidden, *rest = (int(p) for p in parts)
        ffn = rest[0] if rest else None
        bad = [f"{k} must be a positive integer, got {v}"
               for k, v in (("layers", layers), ("hidden", hidden), ("ffn", ffn)) if v is not None and v < 1]
        if hidden >= 1 and hidden % model.head_dim:
            bad.append(f"hidden {hidden} is not a multiple of the stage's head_dim {model.head_dim}")
        if bad:
            errors += [f"{where}: {b}" for b in bad]
            continue
        c = Candidate(layers, hidden, hidden // model.head_dim, ffn if ffn is not None else _ffn_for(model, hidden))
        if c in out:
            errors.append(f"{where}: duplicate candidate")
            continue
        out.append(c)
    if errors:
        raise ConfigError(errors)
    return out


# --------------------------------------------------------------------------- budget
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12, "p": 1e15}


@dataclass(frozen=True)
class Budget:
    kind: str  # "tokens", "fraction" (of the stage's own tokens) or "flops" (per candidate)
    value: float


def parse_budget(text: str | None) -> Budget:
    if text is None:
        return Budget("fraction", 1.0)
    t = re.sub(r"[\s_]", "", text).lower()
    kind = "tokens"
    if t.endswith("x"):
        kind, t = "fraction", t[:-1]
    elif t.endswith("flops") or t.endswith("flop"):
        kind, t = "flops", t[: -5 if t.endswith("flops") else -4]
    elif t.endswith("tokens"):
        t = t[:-6]
    scale = 1.0
    if kind != "fraction" and t and t[-1] in _SCALE and not t[-1].isdigit():
        scale, t = _SCALE[t[-1]], t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise ConfigError(f"--budget: cannot read {text!r} (tokens like 2e6 or 500k, a fraction of the stage's "
                          "own budget like 0.25x, or FLOPs per candidate like 3e12flops)") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--budget: must be > 0, got {text!r}")
    return Budget(kind, value)


# --------------------------------------------------------------------------- recommendation
def gap_limit(heldout: float, max_gap: float, max_gap_rel: float) -> float:
    return max(max_gap, max_gap_rel * heldout)


def recommend(results: list[dict], tolerance: float = 0.05, max_gap: float = 0.05,
              max_gap_rel: float = 0.05) -> dict:
    """Pick a candidate from results with ``params``, ``train_loss``, ``heldout_loss``.

    Marks each result with ``gap``, ``gap_limit``, ``memorizes`` and ``within_tolerance``
    (in place) and returns ``{"index", "status", "best_heldout", "reason", "warning"}``;
    ``status`` is ``ok`` or ``all_memorize``.
    """
    valid = []
    for i, r in enumerate(results):
        r["gap"] = r["heldout_loss"] - r["train_loss"]
        finite = math.isfinite(r["heldout_loss"]) and math.isfinite(r["train_loss"])
        r["gap_limit"] = gap_limit(r["heldout_loss"], max_gap, max_gap_rel) if finite else math.nan
        r["memorizes"] = bool(finite and r["gap"] > r["gap_limit"])
        r["within_tolerance"] = False
        if finite:
            valid.append(i)
    if not valid:
        raise RuntimeError("size search: every candidate diverged (non-finite loss); lower train.lr")
    ok = [i for i in valid if not results[i]["memorizes"]]
    if not ok:
        pick = min(valid, key=lambda i: (results[i]["gap"], results[i]["params"]))
        r = results[pick]
        return {"index": pick, "status": "all_memorize", "best_heldout": None,
                "reason": f"no candidate is free of a memorization gap; {r['label']} has the smallest gap "
                          f"({r['gap']:.3f} > {r['gap_limit']:.3f})",
                "warning": "every candidate memorizes its training text: even the recommended one does. Give the "
                           "stage more text or fewer epochs, or try smaller models (--ladder)."}
    best = min(results[i]["heldout_loss"] for i in ok)
    within = [i for i in ok if results[i]["heldout_loss"] <= best * (1 + tolerance)]
    for i in within:
        results[i]["within_tolerance"] = True
    pick = min(within, key=lambda i: (results[i]["params"], results[i]["heldout_loss"]))
    r = results[pick]
    return {"index": pick, "status": "ok", "best_heldout": best,
            "reason": f"smallest of the {len(ok)} candidate(s) without a memorization gap whose held-out loss "
                      f"{r['heldout_loss']:.4f} is within {tolerance:.0%} of the best, {best:.4f}",
            "warning": None}


# --------------------------------------------------------------------------- data and training
def _cache_dir(cfg: CurriculumConfig, run_dir: Path) -> Path:
    """Tokenizer and token caches for the search, keyed by what the tokenizer depends on.

    Kept apart from the run's own tokenizer.json: a search may precede the run, under a
    config that the run later changes (a stale tokenizer would then be reused silently).
    """
    from llmagogy_ds.data import corpus as D

    seed = cfg.run.seed
    key = {"tokenizer": asdict(cfg.tokenizer), "seed": seed,
           "sources": [[D.source_fingerprint(s, seed) for s in st.data] for st in cfg.stages]}
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).exists():
        key["tokenizer_sha"] = D.file_sha(Path(cfg.tokenizer.path))
    fp = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return run_dir / "size_search" / f"cache-{fp}"


def _training_windows(sampler, n: int):
    """The first ``n`` samples the run trains on, as ``seq_len + 1`` windows (like held-out ones)."""
    import numpy as np

    x, y = sampler.batch(0, n)
    return np.concatenate([x, y[:, -1:]], axis=1)


def train_candidate(c: Candidate, stage: StageConfig, data, vocab: int, tokens: int, seed: int, sampler_seed: int,
                    heldout, train_windows, log=print) -> dict:
    """Train one candidate from scratch for ``tokens`` tokens; losses measured at the end."""
    import torch

    from llmagogy_ds.data.corpus import BlendedSampler
    from llmagogy_ds.evaluation.evaluate import heldout_loss
    from llmagogy_ds.model.flops import flops_per_token
    from llmagogy_ds.model.generations import GenerationLR, param_groups
    from llmagogy_ds.model.gpt import GPT, fresh_init
    from llmagogy_ds.model.layout import n_params, param_generations
    from llmagogy_ds.train.step import LocalEngine, train_step

    m, t = stage.model, stage.train
    layout = initial_layout(c, vocab, m.head_dim)
    torch.manual_seed(seed)
    model = GPT(layout, m.seq_len, m.rope_theta, m.norm_eps)
    model.load_state_dict(fresh_init(layout, m.init_std, torch.Generator().manual_seed(seed)))
    groups = param_groups(model, param_generations(layout), {0: 1.0}, t.weight_decay)
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    seq = m.seq_len
    # the stage's global batch (micro_batch x grad_accum x dp: whole micro-batches), accumulated
    # in this one process by the trainer's own step (same memory as one rank)
    global_batch, micro = t.global_batch_sequences, t.micro_batch
    accum = global_batch // micro
    steps = max(1, -(-tokens // (global_batch * seq)))
    sched = GenerationLR(opt, t.lr, steps, t.warmup_steps, t.schedule, t.min_lr_ratio)
    engine = LocalEngine(model, opt, sched, accum, t.grad_clip)
    sampler = BlendedSampler(data, seq, sampler_seed)  # same data order for every candidate
    model.train()
    t0, last = time.time(), math.nan
    report_every = max(1, steps // 4)
    for step in range(steps):
        # train_step returns the sum of the micro-batch losses: their mean is the global batch's
        last = float(train_step(engine, sampler, step * global_batch, micro, accum, rank=0, dp=1)) / accum
        if not math.isfinite(last):
            log(f"  {c.label}: loss is {last} at step {step + 1}: diverged, stopped")
            break
        if (step + 1) % report_every == 0 and step + 1 < steps:
            log(f"  {c.label}: step {step + 1}/{steps}  loss {last:.4f}  ({time.time() - t0:.0f} s)")
    train_wall = time.time() - t0
    done_steps = step + 1
    trained = done_steps * global_batch * seq
    fpt = flops_per_token(layout, seq)
    train_loss = heldout_loss(model, train_windows, micro)
    held = heldout_loss(model, heldout, micro)
    return {
        "label": c.label, **asdict(c), "params": n_params(layout),
        "params_non_embedding": n_params(layout) - 2 * vocab * c.hidden,
        "steps": done_steps, "tokens": trained, "flops": fpt * trained,
        "epochs": max(sampler.epochs(done_steps * global_batch)),
        "last_batch_loss": last, "train_loss": train_loss, "heldout_loss": held,
        "wall_seconds": time.time() - t0, "tokens_per_s": trained / max(1e-9, train_wall),
    }


# --------------------------------------------------------------------------- the search
def search(cfg: CurriculumConfig, stage_name: str, run_dir: Path, out: Path | None = None,
           ladder: list[Candidate] | None = None, budget: Budget | None = None, tolerance: float = 0.05,
           max_gap: float = 0.05, max_gap_rel: float = 0.05, log=print) -> dict:
    """Run the search for one stage; writes ``size_search.json`` and ``.png`` in ``out``."""
    from llmagogy_ds.data import prepare as DP
    from llmagogy_ds.data.corpus import BlendedSampler, heldout_windows
    from llmagogy_ds.model.flops import flops_per_token

    _check_stage(cfg, stage_name)
    for key, v in (("--tolerance", tolerance), ("--max-gap", max_gap), ("--max-gap-rel", max_gap_rel)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{key}: must be a number >= 0, got {v}")
    s = cfg.stage_index(stage_name)
    stage = cfg.stages[s]
    ladder = ladder if ladder is not None else default_ladder(stage.model)
    budget = budget or parse_budget(None)
    out = Path(out) if out is not None else Path(run_dir) / "size_search" / stage_name
    RD.check_writable(out / "size_search.json")  # before the training, whose results would be lost

    cache = _cache_dir(cfg, Path(run_dir))
    cache.mkdir(parents=True, exist_ok=True)
    tok, sha = DP.ensure_tokenizer(cfg, cache)
    data = DP.stage_data(cfg, cache, s, tok, sha)
    vocab, seq = tok.get_vocab_size(), stage.model.seq_len
    heldout = heldout_windows(data, seq, stage.train.eval_tokens)
    sampler_seed = cfg.run.seed + 17 * s  # the trainer's, so candidates see the stage's data order
    train_windows = _training_windows(BlendedSampler(data, seq, sampler_seed), len(heldout))

    step_tokens = stage.train.global_batch_sequences * seq
    if stage.train.tokens is not None:
        own = stage.train.tokens
    else:
        own = int(stage.train.epochs * sum(w * seq for w in BlendedSampler(data, seq, sampler_seed).windows))
    fpts = [flops_per_token(initial_layout(c, vocab, stage.model.head_dim), seq) for c in ladder]
    if budget.kind == "flops":
        tokens = [int(budget.value / f) for f in fpts]
    else:
        tokens = [int(budget.value if budget.kind == "tokens" else budget.value * own)] * len(ladder)
    short = [f"{c.label}: {n} tokens" for c, n in zip(ladder, tokens) if n < step_tokens]
    if short:
        raise ConfigError(f"--budget: less than one optimizer step ({step_tokens} tokens = global batch "
                          f"{stage.train.global_batch_sequences} x seq_len {seq}) for {', '.join(short)}")
    total_flops = sum(f * n for f, n in zip(fpts, tokens))
    each = f"{budget.value:.3g} FLOPs" if budget.kind == "flops" else f"{tokens[0]:,} tokens"
    log(f"[size-search] stage {stage_name}: {len(ladder)} candidates, {each} each (the stage's own budget: "
        f"{own:,} tokens), {total_flops / 1e12:.2f} TFLOPs in all; "
        f"{len(heldout)} held-out and {len(train_windows)} training windows of {seq + 1} tokens")

    results = []
    for i, (c, n) in enumerate(zip(ladder, tokens)):
        log(f"[size-search] {i + 1}/{len(ladder)} {c.label} (heads {c.heads}, ffn {c.ffn}): {n} tokens")
        r = train_candidate(c, stage, data, vocab, n, cfg.run.seed * 1000 + s, sampler_seed, heldout,
                            train_windows, log)
        r["stage_shape"] = (c.layers, c.hidden, c.heads, c.ffn) == tuple(getattr(stage.model, k) for k in MODEL_KEYS)
        log(f"[size-search]   train {r['train_loss']:.4f}  held-out {r['heldout_loss']:.4f}  "
            f"gap {r['heldout_loss'] - r['train_loss']:+.4f}  {r['wall_seconds']:.0f} s")
        results.append(r)
    rec = recommend(results, tolerance, max_gap, max_gap_rel)
    report = {
        "stage": stage_name, "config": cfg.source_path, "run_dir": str(run_dir), "vocab": vocab, "seq_len": seq,
        "stage_shape": {k: getattr(stage.model, k) for k in MODEL_KEYS},
        "budget": {"kind": budget.kind, "value": budget.value, "stage_tokens": own},
        "heldout_windows": len(heldout), "train_windows": len(train_windows),
        "rule": {"tolerance": tolerance, "max_gap": max_gap, "max_gap_rel": max_gap_rel},
        "candidates": results, "recommendation": {**rec, **{k: results[rec["index"]][k] for k in MODEL_KEYS},
                                                  "label": results[rec["index"]]["label"]},
    }
    out.mkdir(parents=True, exist_ok=True)
    report["json"], report["plot"] = str(out / "size_search.json"), str(out / "size_search.png")
    RD.write_atomic(out / "size_search.json", report)  # first: a failing plot must not lose the results
    P.plot_size_search(report, out / "size_search.png")
    return report


# --------------------------------------------------------------------------- output
def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rec = report["recommendation"]
    t = Table(title=f"size search: stage {report['stage']}")
    for col in ("D x W", "heads", "ffn", "params", "tokens", "epochs", "GFLOPs", "train", "held-out", "gap",
                "limit", "wall s", "verdict"):
        t.add_column(col, justify="left" if col in ("D x W", "verdict") else "right")
    for i, r in enumerate(report["candidates"]):
        verdict = "memorizes" if r["memorizes"] else ("ok, within tol." if r["within_tolerance"] else "ok")
        if i == rec["index"]:
            verdict = "[bold green]recommended[/]" + ("" if rec["status"] == "ok" else " [red](memorizes)[/]")
        t.add_row(r["label"] + (" (stage)" if r.get("stage_shape") else ""), str(r["heads"]), str(r["ffn"]),
                  f"{r['params']:,}", f"{r['tokens']:,}", f"{r['epochs']:.1f}", f"{r['flops'] / 1e9:.1f}",
                  f"{r['train_loss']:.4f}", f"{r['heldout_loss']:.4f}", f"{r['gap']:+.4f}", f"{r['gap_limit']:.4f}",
                  f"{r['wall_seconds']:.0f}", verdict)
    c = Console(width=160)
    c.print(t)
    c.print(f"recommended: {rec['label']} -- {rec['reason']}")
    if rec["warning"]:
        c.print(f"[bold red]warning:[/] {rec['warning']}")


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, help="the stage whose corpus and training set-up are searched")
    p.add_argument("--ladder", default=None, metavar="D,W;D,W;...",
                   help="candidates as layers,hidden[,ffn] (default: (D/2,W/2) (D,W/2) (D,W) (2D,W) (2D,2W) "
                        "around the stage's shape)")
    p.add_argument("--budget", default=None,
                   help="per candidate: tokens (2e6, 500k), a fraction of the stage's own budget (0.25x), or FLOPs "
                        "(3e12flops); default the stage's own budget")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="recommend the smallest candidate with held-out loss <= best x (1 + tolerance) (default 0.05)")
    p.add_argument("--max-gap", type=float, default=0.05,
                   help="memorization: held-out - train > max(max-gap, max-gap-rel x held-out) (default 0.05 nats)")
    p.add_argument("--max-gap-rel", type=float, default=0.05, help="see --max-gap (default 0.05)")
    p.add_argument("--out", type=Path, default=None, help="output dir (default RUN_DIR/size_search/STAGE)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default torch's: one per core); 1 is often faster for small "
                        "models on a CPU shared with other jobs")
    p.add_argument("--write", action="store_true",
                   help="write the recommended shape into CONFIG.sized.yaml beside the config (never the config itself)")


def cmd_size_search(args) -> int:
    cfg = load_config(args.config, args.overrides)
    _check_stage(cfg, args.stage)
    stage = cfg.stage(args.stage)
    ladder = parse_ladder(args.ladder, stage.model) if args.ladder is not None else None
    budget = parse_budget(args.budget)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be a positive integer, got {args.threads}")
    if args.write:
        check_writable(Path(args.config))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_dir = args.run_dir or Path("runs") / cfg.run.name
    report = search(cfg, args.stage, run_dir, args.out, ladder, budget, args.tolerance, args.max_gap,
                    args.max_gap_rel, log=lambda m: print(m, flush=True))
    print_table(report)
    print(f"[size-search] results: {report['json']}\n[size-search] plot: {report['plot']}")
    if args.write:
        rec = report["recommendation"]
        values = {k: rec[k] for k in MODEL_KEYS}
        path, kept = write_sized_config(Path(args.config), args.stage, values, args.overrides)
        note = "" if kept else " (re-dumped: comments of the original are not kept)"
        print(f"[size-search] wrote {path}: stage {args.stage} model {values}{note}")
        report["sized_config"] = str(path)
        RD.write_atomic(Path(report["json"]), report)
    return 0


__all__ = ["Candidate", "Budget", "default_ladder", "parse_ladder", "parse_budget", "recommend", "gap_limit",
           "search", "train_candidate", "print_table", "add_arguments", "cmd_size_search"]
