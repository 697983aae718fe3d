"""``llmagogy route``: the probe fitted (or reused), the routers scored on a mixed held-out set
(every expert's own held-out documents, each labelled by its expert), a source routed document
by document (``routes.jsonl``: resumable, one part per rank), and the figures (``route.json``)
and a readable report (``route.md``).

**Loss** is nats per token over every token of every document (the sum over documents of their
summed negative log-likelihood, over their tokens). **Compute** is forward FLOPs, ``2·N`` per
token read (``N``: ``model.flops.matmul_params``; attention left out, as it depends on the
context length, not on the router): an expert alone or the oracle router (each document to
its own expert) costs its model over the document; the probe router the gatekeeper over the
first ``probe_tokens`` tokens and its logistic regression, then the chosen expert over the
document; the prefix router every expert over the first ``prefix_tokens`` tokens, then the
chosen expert over the document.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.config.schema import DataSource
from llmagogy_ds.data.reading import source_bytes
from llmagogy_ds.evaluation.contrast import (SPLITS, encode_documents, open_out, rank_device, read_parts,
                                             score_into_parts, token_log_likelihoods, world)
from llmagogy_ds.evaluation.results import load_model, weights_fingerprint as fingerprint
from llmagogy_ds.evaluation.route import (METHODS, Member, RouteError, check_inputs, corpus_documents,
                                          fit_probe, pooled_hidden, prefix_losses, route_documents)
from llmagogy_ds.fmt import md_table, num, pct, si
from llmagogy_ds.model.flops import matmul_params

META, ROUTING, ROUTES, REPORT = "route.json", "routing.json", "routes.jsonl", "route.md"


def run_route(gatekeeper, experts: list, src: DataSource | None = None, out: Path | None = None, *, general=None,
              methods: tuple[str, ...] = METHODS, probe_tokens: int = 128, probe_docs: int = 200,
              prefix_tokens: int = 32, eval_docs: int = 200, l2: float = 1e-2, split: str = "all", batch: int = 32,
              docs_per_step: int = 256, device=None, progress: bool = True, log=print) -> dict:
    """``llmagogy route``; returns ``route.json``'s content on rank 0 ({} on the others)."""
    check_settings(methods, probe_tokens, probe_docs, prefix_tokens, eval_docs, l2, split, batch, src)
    gate, ex, gen, sha = check_inputs(gatekeeper, experts, general)
    out = Path(out) if out is not None else gate.run_dir / RD.ROUTE
    RD.check_writable(out / META)
    K = min(probe_tokens, gate.cfg.stages[gate.stage].model.seq_len - 1)  # the EOS in front takes a position
    P = prefix_tokens if "prefix" in methods else None
    T = min(m.cfg.stages[m.stage].model.seq_len for m in (gate, *ex, *([gen] if gen else [])))
    rank, n_ranks = world()
    ident = None
    if src is not None:
        ident = {"gatekeeper": fingerprint(gate.checkpoint), "experts": [fingerprint(m.checkpoint) for m in ex],
                 "methods": list(methods), "probe_tokens": K, "probe_docs": probe_docs, "probe_l2": l2,
                 "prefix_tokens": prefix_tokens, "source": src.path, "heldout": src.heldout,
                 "text_field": src.text_field, "split": split, "source_bytes": source_bytes(src),
                 "tokenizer_sha256": sha}
        open_out(out, ident, rank, ROUTING, "routing", RouteError)  # before any model is loaded
    train = held = None
    if rank == 0:  # the corpora read (and a missing split named) before any model is loaded
        train = [corpus_documents(m, "train", probe_docs) for m in ex] if "probe" in methods else None
        held = [corpus_documents(m, "heldout", eval_docs) for m in ex] if eval_docs else None
    dev = rank_device(device)
    gm, tok, _, _ = load_model(gate.checkpoint, dev)  # the gatekeeper stays; the others come one at a time

    def params(m: Member) -> int:  # from its run's layout: no model loaded for it
        return matmul_params(m.layout(tok.get_vocab_size()))
    probe = probe_meta = figures = None
    if rank == 0:  # the others wait for rank 0's probe, then load it
        if "probe" in methods:
            probe, probe_meta = fit_probe(gm, tok, gate, ex, out, K, probe_docs, l2, train, batch, log)
        if held:
            figures = evaluate(gm, ex, gen, lambda m: load_model(m.checkpoint, dev)[0], params, tok, held, probe, K,
                               P, T, batch)
    if n_ranks > 1:
        dist.barrier()
        if rank != 0 and "probe" in methods:
            probe, _ = fit_probe(gm, tok, gate, ex, out, K, probe_docs, l2, batch=batch, log=log)
    if src is not None:
        names = [m.name for m in ex]
        em = [load_model(m.checkpoint, dev)[0] for m in ex] if P is not None else []  # prefix routing: every expert
        score_into_parts(out, src, gate.cfg.run.seed, SPLITS[split],
                         lambda docs: route_documents(gm, em, names, tok, docs, probe, K, P, T, batch),
                         docs_per_step, "route", progress)
        del em
    if rank != 0:
        return {}
    res = {"status": "done", "gatekeeper": describe(gate, params), "experts": [describe(m, params) for m in ex],
           "general": describe(gen, params) if gen else None, "methods": list(methods),
           "settings": {"probe_tokens": K, "probe_docs": probe_docs, "probe_l2": l2, "prefix_tokens": prefix_tokens,
                        "eval_docs": eval_docs, "seq_len": T, "tokenizer_sha256": sha},
           "probe": probe_meta and {k: v for k, v in probe_meta.items() if k != "key"},
           "evaluation": figures, "routes": routes_summary(out, ident, [m.name for m in ex], methods)
           if src is not None else None, "files": {"route": str(out / META), "report": str(out / REPORT)}}
    if src is not None:
        res["files"]["routes"] = str(out / ROUTES)
    RD.write_atomic(out / META, res)
    RD.write_atomic(out / REPORT, report_md(res))
    return res


def check_settings(methods, probe_tokens: int, probe_docs: int, prefix_tokens: int, eval_docs: int, l2: float,
                   split: str, batch: int, src: DataSource | None) -> None:
    """The command's numbers and choices, each named in its error."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise RouteError(f"--method: expected probe, prefix or both, got {', '.join(bad) or 'none'}")
    for flag, v, least in (("--probe-tokens", probe_tokens, 1), ("--probe-docs", probe_docs, 1),
                           ("--prefix-tokens", prefix_tokens, 1), ("--eval-docs", eval_docs, 0), ("--batch", batch, 1)):
        if v < least:
            raise RouteError(f"{flag} must be >= {least}, got {v}")
    if l2 < 0:
        raise RouteError(f"--probe-l2 must be >= 0, got {l2}")
    if split not in SPLITS:
        raise RouteError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if src is not None and src.format != "text":
        raise RouteError(f"--data: {src.path} is pre-tokenized (format: {src.format}); route reads text")


def describe(m: Member, params) -> dict:
    return {"name": m.name, "checkpoint": str(m.checkpoint), "run_dir": str(m.run_dir), "stage": m.stage_name,
            "own_stages": [m.cfg.stages[s].name for s in m.own] or None, "fingerprint": fingerprint(m.checkpoint),
            "matmul_params": params(m)}


def routes_summary(out: Path, ident: dict, names: list[str], methods) -> dict:
    """Merge the part files into ``routes.jsonl`` (by document index); how many documents each
    method sends to each expert, and how often the two methods agree."""
    rows = sorted(read_parts(out).values(), key=lambda r: r["index"])
    RD.write_atomic(out / ROUTES, "".join(json.dumps(r) + "\n" for r in rows))
    res = {"documents": len(rows), "tokens": int(sum(r["tokens"] for r in rows)),
           "by_method": {m: {n: sum(r[m] == n for r in rows) for n in names} for m in methods}}
    if len(methods) == 2:
        res["agreement"] = float(np.mean([r["probe"] == r["prefix"] for r in rows])) if rows else None
    RD.write_atomic(out / ROUTING, {"identity": ident, "status": "done", "documents": len(rows)})
    return res


# --------------------------------------------------------------------------- the mixed held-out set
def evaluate(gm, ex: list[Member], gen: Member | None, load, params, tok, held: list[list[str]], probe,
             K: int, prefix_tokens: int | None, T: int, batch: int) -> dict:
    """Routing accuracy, confusion matrices, the loss of every system (overall and per expert's
    domain) and its compute on the mixed held-out set (``held``: each expert's documents).
    ``load(member)`` gives a model: one at a time beside the gatekeeper ``gm``, scored, let go;
    ``params(member)`` its matmul parameters."""
    texts = [t for docs in held for t in docs]
    y = np.array([k for k, docs in enumerate(held) for _ in docs])
    _, ids = encode_documents(tok, texts)
    n = np.array([len(r) - 1 for r in ids], dtype=float)
    lls = [token_log_likelihoods(load(m), ids, T, batch) for m in ex]
    nll = np.stack([[-ll.sum() for ll in per] for per in lls], 1)  # [documents, experts]
    cost = np.array([2.0 * params(m) for m in ex])  # forward FLOPs per token
    gate_params = matmul_params(gm.layout)
    rows = np.arange(len(y))
    choice, router = {}, {}
    if probe is not None:
        choice["probe"] = probe.probabilities(pooled_hidden(gm, ids, K, batch)).argmax(-1).numpy()
        router["probe"] = 2.0 * gate_params * np.minimum(K, n) + probe.flops_per_document()
    if prefix_tokens is not None:
        choice["prefix"] = np.stack([prefix_losses(ll, prefix_tokens) for ll in lls], 1).argmin(1)
        router["prefix"] = np.minimum(prefix_tokens, n) * cost.sum()
    systems = {f"routed ({m})": (nll[rows, c], router[m] + cost[c] * n) for m, c in choice.items()}
    systems["oracle router"] = (nll[rows, y], cost[y] * n)
    for k, m in enumerate(ex):
        systems[f"expert {m.name}"] = (nll[:, k], cost[k] * n)
    alone = {"gatekeeper": (lambda: gm, gate_params)}
    if gen is not None:
        alone["general"] = (lambda: load(gen), params(gen))
    for name, (model, p) in alone.items():
        own = np.array([-ll.sum() for ll in token_log_likelihoods(model(), ids, T, batch)])
        systems[f"{name} alone"] = (own, 2.0 * p * n)
    names = [m.name for m in ex]
    res = {"documents": {m.name: int((y == k).sum()) for k, m in enumerate(ex)}, "tokens": int(n.sum()),
           "accuracy": {m: float((c == y).mean()) for m, c in choice.items()},
           "recall": {m: {nm: float((c[y == k] == k).mean()) for k, nm in enumerate(names)} for m, c in choice.items()},
           "confusion": {m: [[int(((y == a) & (c == b)).sum()) for b in range(len(ex))] for a in range(len(ex))]
                         for m, c in choice.items()},
           "systems": {}}
    for name, (loss, flops) in systems.items():
        res["systems"][name] = {"loss": float(loss.sum() / n.sum()),
                                "loss_by_domain": {nm: float(loss[y == k].sum() / n[y == k].sum())
                                                   for k, nm in enumerate(names)},
                                "flops_per_document": float(flops.mean()),
                                "flops_per_token": float(flops.sum() / n.sum())}
    best = min((f"expert {nm}" for nm in names), key=lambda s: res["systems"][s]["loss"])
    res["best_single_expert"] = best
    return res


# --------------------------------------------------------------------------- the report
def report_md(res: dict) -> str:
    g, ev = res["gatekeeper"], res["evaluation"]
    names = [e["name"] for e in res["experts"]]
    lines = [f"# Routing to {len(names)} experts: gatekeeper {g['stage']} of {g['run_dir']}", ""]
    models = [[m["name"], m["stage"], ", ".join(m["own_stages"] or []) or "-", si(m["matmul_params"], billion="B"),
               f"`{m['fingerprint']}`", f"`{m['run_dir']}`"] for m in [g, *res["experts"], res["general"]] if m]
    lines += [md_table(["model", "stage", "own corpus", "N (matmul)", "fingerprint", "run"], models), ""]
    st = res["settings"]
    lines += [f"Routers: {', '.join(res['methods'])}. The probe reads the gatekeeper's final normed hidden states, "
              f"mean over a document's first {st['probe_tokens']} tokens (trained on {st['probe_docs']} training "
              f"documents of each expert's own corpus, L2 {st['probe_l2']}); the prefix router sends a document to "
              f"the expert with the lowest loss on its first {st['prefix_tokens']} tokens.", ""]
    if res.get("probe"):
        lines += [f"Probe: {res['probe']['features']} features, {pct(res['probe']['train_accuracy'])} right on its "
                  "training documents.", ""]
    if ev:
        docs = ", ".join(f"{k} {v}" for k, v in ev["documents"].items())
        lines += ["## The mixed held-out set", "",
                  f"{sum(ev['documents'].values())} documents ({docs}), {ev['tokens']:,} tokens: the held-out "
                  "documents of every expert's own corpus, labelled by their expert.", "", "### Routing accuracy", "",
                  md_table(["router", "accuracy", *(f"recall {nm}" for nm in names)],
                           [[m, pct(a), *(pct(ev["recall"][m][nm]) for nm in names)]
                            for m, a in ev["accuracy"].items()]), ""]
        for m, conf in ev["confusion"].items():
            lines += [f"Confusion ({m}): rows the document's expert, columns the chosen one.", "",
                      md_table(["", *names], [[nm, *map(str, row)] for nm, row in zip(names, conf)]), ""]
        lines += ["### Loss (nats/token) and forward FLOPs", "",
                  md_table(["system", "mixed", *names, "FLOPs/doc", "FLOPs/token"],
                           [[s, num(v["loss"]), *(num(v["loss_by_domain"][nm]) for nm in names),
                             si(v["flops_per_document"]), si(v["flops_per_token"])] for s, v in ev["systems"].items()]),
                  "", f"Best single expert: {ev['best_single_expert']}."]
        if "prefix" in res["methods"]:
            lines += ["", "The prefix router has seen the first tokens of the document it is then scored on (they are "
                      "part of it); the probe only reads the gatekeeper's hidden states."]
        lines.append("")
    if res.get("routes"):
        r = res["routes"]
        lines += ["## Routes", "", f"{r['documents']:,} documents ({r['tokens']:,} tokens): `{res['files']['routes']}`",
                  "", md_table(["router", *names], [[m, *(str(c[nm]) for nm in names)]
                                                    for m, c in r["by_method"].items()]), ""]
        if r.get("agreement") is not None:
            lines += [f"The two routers agree on {pct(r['agreement'])} of the documents.", ""]
    return "\n".join(lines)


__all__ = ["run_route", "evaluate", "report_md", "routes_summary"]
