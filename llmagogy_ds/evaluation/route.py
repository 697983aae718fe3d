"""The gatekeeper (the article's section 5.6): which expert serves a document. The experts are
runs branched from one trunk stage (``llmagogy branch``), each trained on its own corpus; the
gatekeeper is the pre-final model (or any model of the same tokenizer, e.g. it trained further
on general text). Two routers, both documented in the README:

* **probe**: a multinomial logistic regression on the gatekeeper's final normed hidden states
  (what its LM head reads), mean-pooled over a document's first ``probe_tokens`` tokens. It is
  trained on ``probe_docs`` training documents of each expert's own corpus (features standardized,
  L2 penalty, full-batch L-BFGS) and saved beside the routes (``probe.safetensors`` +
  ``probe.json``, keyed by the gatekeeper's and every expert's weights) so that a later route
  reuses it. Cost: the gatekeeper's forward over the first ``probe_tokens`` tokens.
* **prefix**: every expert scores the document's first ``prefix_tokens`` tokens; the one with the
  lowest loss serves it. Cost: every expert's forward over the prefix. It has seen the tokens it
  is then scored on (the prefix is part of the document).

An expert's own corpus is the data of its stages after the branch point (``lineage.json``'s
``from_index``); a run without a lineage: the data of its last stage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmagogy_ds import rundir as RD
from llmagogy_ds.config.schema import CurriculumConfig
from llmagogy_ds.data.reading import source_documents
from llmagogy_ds.evaluation.contrast import encode_documents, one_tokenizer, token_log_likelihoods
from llmagogy_ds.evaluation.exams import device_of
from llmagogy_ds.evaluation.results import locate_checkpoint, weights_fingerprint as fingerprint

METHODS = ("probe", "prefix")
PROBE_WEIGHTS, PROBE_META = "probe.safetensors", "probe.json"


class RouteError(ValueError):
    """Bad route input (gatekeeper, experts, source, settings): one line naming what and why."""


# --------------------------------------------------------------------------- the models
@dataclass
class Member:
    """A model of the routed system: the gatekeeper, an expert or a general model."""

    name: str
    given: str  # the path as the user gave it
    checkpoint: Path
    run_dir: Path
    stage: int
    cfg: CurriculumConfig
    own: tuple[int, ...] = ()  # an expert's own stages (its corpus)

    @property
    def stage_name(self) -> str:
        return self.cfg.stages[self.stage].name

    def layout(self, vocab: int):
        """Its model's layout, from the run's config (no weights read)."""
        return RD.run_plan(self.run_dir, self.cfg, vocab).layout(self.stage)


def member(path, flag: str, name: str | None = None) -> Member:
    """The model at ``path`` (what ``llmagogy eval`` takes); an error names the ``flag`` it came from."""
    try:
        ckpt, run, s = locate_checkpoint(path)
    except RD.RunDirError as e:
        raise RouteError(f"{flag}: {e}") from None
    return Member(name or run.name, str(path), ckpt, run, s, RD.load_run_config(run))


def own_stages(m: Member) -> tuple[int, ...]:
    """An expert's stages after the branch point up to the given one (a run without
    ``lineage.json``: the given stage), those with text data; a ``RouteError`` when none."""
    lineage = RD.read_json(RD.lineage_path(m.run_dir))
    first = int(lineage["from_index"]) + 1 if lineage else m.stage
    if m.stage < first:
        raise RouteError(f"--experts {m.given}: no own corpus (stage {m.stage_name} is the trunk's; it branched "
                         f"from {lineage['from_stage']}): give a run or stage after the branch point")
    own = tuple(s for s in range(first, m.stage + 1) if any(src.format == "text" for src in m.cfg.stages[s].data))
    if not own:
        raise RouteError(f"--experts {m.given}: no own corpus of text (stages "
                         f"{', '.join(m.cfg.stages[s].name for s in range(first, m.stage + 1))} are pre-tokenized)")
    return own


def expert_name(m: Member) -> str:
    """The name ``llmagogy branch`` gave the expert, else its run dir's."""
    lineage = RD.read_json(RD.lineage_path(m.run_dir))
    return str(lineage.get("expert") or m.run_dir.name) if lineage else m.run_dir.name


def registered_experts(path) -> list:
    """A trunk run dir whose ``experts.json`` (``llmagogy branch``) lists experts stands for them,
    in its order; any other path for itself."""
    reg = RD.read_json(Path(path) / RD.EXPERTS) if Path(path).is_dir() else None
    return [e["run_dir"] for e in reg.values()] if reg else [path]


def check_inputs(gatekeeper, experts, general=None) -> tuple[Member, list[Member], Member | None, str]:
    """``(gatekeeper, experts, general or None, tokenizer sha)``, every input checked before any
    model is loaded: paths, one tokenizer, each expert's own corpus, distinct expert names."""
    experts = [e for path in experts for e in registered_experts(path)]
    if len(experts) < 2:
        raise RouteError(f"--experts: give at least two expert runs (got {len(experts)})")
    gate = member(gatekeeper, "--gatekeeper", "gatekeeper")
    ex = []
    for path in experts:
        m = member(path, "--experts")
        m.name = expert_name(m)
        m.own = own_stages(m)
        ex.append(m)
    seen: dict[str, Member] = {}
    for m in ex:
        if m.name in seen:
            raise RouteError(f"--experts: {seen[m.name].given} and {m.given} are both expert {m.name!r}; give each "
                             f"expert once")
        seen[m.name] = m
    gen = member(general, "--general", "general") if general is not None else None
    runs = {str(gatekeeper): gate.run_dir, **{m.given: m.run_dir for m in ex}}
    if gen is not None:
        runs[str(general)] = gen.run_dir
    sha = one_tokenizer(runs, "the gatekeeper and its experts are models", RouteError)
    return gate, ex, gen, sha


def corpus_documents(m: Member, role: str, n: int) -> list[str]:
    """The first ``n`` documents of ``role`` (train / heldout) of an expert's own corpus, taken
    from its text sources in turn, read as streams."""
    streams = [source_documents(src, m.cfg.run.seed, roles=(role,)) for s in m.own for src in m.cfg.stages[s].data
               if src.format == "text"]
    out: list[str] = []
    while streams and len(out) < n:
        for it in list(streams):
            doc = next(it, None)
            if doc is None:
                streams.remove(it)
            elif len(out) < n:
                out.append(doc[1])
    if not out:
        raise RouteError(f"--experts {m.given}: its own corpus has no {role} documents "
                         f"({', '.join(src.path for s in m.own for src in m.cfg.stages[s].data)})")
    return out


# --------------------------------------------------------------------------- the probe
@torch.no_grad()
def pooled_hidden(model, ids: list[list[int]], tokens: int, batch: int = 32) -> torch.Tensor:
    """[documents, hidden]: the model's final normed hidden states at a document's first
    ``tokens`` tokens (after its EOS: ``ids`` as ``encode_documents`` gives them), averaged."""
    dev = device_of(model)
    out = []
    for b in range(0, len(ids), batch):
        rows = [r[: tokens + 1] for r in ids[b: b + batch]]
        x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros(x.shape)
        for i, r in enumerate(rows):  # padding at the end: causal attention never lets it reach a token
            x[i, : len(r)] = torch.as_tensor(r)
            mask[i, 1 if len(r) > 1 else 0: len(r)] = 1.0  # the EOS alone only for an empty document
        h = model.hidden(x.to(dev)).float().cpu()
        out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


class Probe:
    """``softmax(W (x - mean) / std + b)`` over the experts: the probe router."""

    def __init__(self, tensors: dict[str, torch.Tensor], experts: list[str]):
        self.t, self.experts = tensors, experts

    @classmethod
    def train(cls, feats: torch.Tensor, labels: torch.Tensor, experts: list[str], l2: float) -> "Probe":
        """Full-batch L-BFGS on the mean cross-entropy plus ``l2/2 ||W||²`` (features standardized,
        so that one ``l2`` suits any model's hidden size); deterministic for given features."""
        mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        z = ((feats - mean) / std).double()
        w = torch.zeros(len(experts), feats.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(experts), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w.T + b, labels) + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls({"weight": w.detach().float(), "bias": b.detach().float(), "mean": mean, "std": std}, experts)

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        z = (feats - self.t["mean"]) / self.t["std"]
        return torch.softmax(z @ self.t["weight"].T + self.t["bias"], -1)

    def flops_per_document(self) -> int:
        return 2 * self.t["weight"].numel()

    def save(self, out: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (PROBE_WEIGHTS + ".tmp")
        save_file({k: v.contiguous() for k, v in self.t.items()}, str(tmp))
        tmp.replace(out / PROBE_WEIGHTS)
        RD.write_atomic(out / PROBE_META, meta)  # last: the pair is complete

    @classmethod
    def load(cls, out: Path, key: dict) -> "Probe | None":
        """The probe saved in ``out`` when it was trained for ``key`` (the same gatekeeper, experts
        in the same order, settings), else None."""
        meta = RD.read_json(out / PROBE_META) if (out / PROBE_META).exists() else None
        if not meta or meta.get("key") != key or not (out / PROBE_WEIGHTS).exists():
            return None
        from safetensors.torch import load_file

        return cls(load_file(str(out / PROBE_WEIGHTS)), [e["name"] for e in key["experts"]])


def probe_key(gate: Member, experts: list[Member], tokens: int, docs: int, l2: float) -> dict:
    """What a saved probe must have been trained for to be reused."""
    return {"gatekeeper": {"checkpoint": str(gate.checkpoint.resolve()), "fingerprint": fingerprint(gate.checkpoint)},
            "experts": [{"name": m.name, "checkpoint": str(m.checkpoint.resolve()),
                         "fingerprint": fingerprint(m.checkpoint)} for m in experts],
            "probe_tokens": tokens, "probe_docs": docs, "l2": l2}


def fit_probe(gate_model, tok, gate: Member, experts: list[Member], out: Path, tokens: int, docs: int, l2: float,
              train: list[list[str]] | None = None, batch: int = 32, log=print) -> tuple[Probe, dict]:
    """The probe saved in ``out`` for these models and settings, else one trained on ``docs``
    training documents of each expert's own corpus (``train``: read already) and saved. Returns
    it and ``probe.json``."""
    key = probe_key(gate, experts, tokens, docs, l2)
    probe = Probe.load(out, key)
    if probe is not None:
        return probe, RD.read_json(out / PROBE_META)
    train = train or [corpus_documents(m, "train", docs) for m in experts]
    feats, labels, counts = [], [], {}
    for k, (m, texts) in enumerate(zip(experts, train)):
        feats.append(pooled_hidden(gate_model, encode_documents(tok, texts)[1], tokens, batch))
        labels += [k] * len(texts)
        counts[m.name] = len(texts)
    x, y = torch.cat(feats), torch.tensor(labels)
    probe = Probe.train(x, y, [m.name for m in experts], l2)
    acc = float((probe.probabilities(x).argmax(-1) == y).double().mean())
    meta = {"key": key, "documents": counts, "features": int(x.shape[1]), "train_accuracy": acc}
    probe.save(out, meta)
    log(f"[llmagogy] probe trained on {sum(counts.values()):,} documents ({acc:.1%} right on them): "
        f"{out / PROBE_WEIGHTS}")
    return probe, meta


# --------------------------------------------------------------------------- routing documents
def prefix_losses(lls: list[np.ndarray], tokens: int) -> np.ndarray:
    """Mean loss (nats/token) of each document's first ``tokens`` tokens (``lls``: per-token
    log-likelihoods; a window cut at 0 gives the same as scoring the prefix alone)."""
    return np.array([-float(ll[:tokens].mean()) if len(ll) else 0.0 for ll in lls])


def route_documents(gate_model, experts: list, names: list[str], tok, docs: list[tuple[int, str]], probe: Probe | None,
                    probe_tokens: int, prefix_tokens: int | None, seq_len: int, batch: int = 32) -> list[dict]:
    """One ``routes.jsonl`` record per ``(index, text)``: the expert each method chooses, the
    probe's probabilities, the experts' prefix losses (``prefix_tokens`` None: no prefix)."""
    _, ids = encode_documents(tok, [t for _, t in docs])
    recs = [{"index": i, "tokens": len(r) - 1} for (i, _), r in zip(docs, ids)]
    if probe is not None:
        p = probe.probabilities(pooled_hidden(gate_model, ids, probe_tokens, batch)).numpy()
        for rec, row in zip(recs, p):
            rec["probe"] = names[int(row.argmax())]
            rec["probe_p"] = {n: round(float(v), 6) for n, v in zip(names, row)}
    if prefix_tokens is not None:
        heads = [r[: prefix_tokens + 1] for r in ids]
        losses = np.stack([prefix_losses(token_log_likelihoods(m, heads, seq_len, batch), prefix_tokens)
                           for m in experts], 1)
        for rec, row in zip(recs, losses):
            rec["prefix"] = names[int(row.argmin())]
            rec["prefix_loss"] = {n: round(float(v), 6) for n, v in zip(names, row)}
    return recs


def read_routes(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


__all__ = ["RouteError", "Member", "Probe", "METHODS", "check_inputs", "corpus_documents", "pooled_hidden", "fit_probe",
           "prefix_losses", "route_documents", "read_routes", "registered_experts"]
