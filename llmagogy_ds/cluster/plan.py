"""``llmagogy plan``: what every stage will cost, before anything runs.

For each stage of a curriculum: parameters (total / trainable under the stage's F
multipliers), tokens, FLOPs, memory per GPU, and time and nodes at an assumed MFU on a
GPU kind from ``memory.GPUS``. Stages whose memory does not fit the GPU are flagged.

Everything is derived from the config and the generation layout (``layout.stage_layouts``),
exactly as the trainer builds the model; nothing is allocated.

The memory model, per GPU, and the GPU table are in ``cluster/memory.py``.

Time: ``FLOPs / (nproc * peak * MFU)`` with ``flops.flops_per_token`` (6·N + attention,
frozen weights included) times the tokens actually trained (whole optimizer steps).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from llmagogy_ds.cluster.memory import GPU, GiB, MemoryEstimate, estimate_memory, get_gpu, weight_tensors
from llmagogy_ds.config import CurriculumConfig, StageConfig
from llmagogy_ds.fmt import duration, si
from llmagogy_ds.model.flops import flops_per_token
from llmagogy_ds.model.stages import Plan

__all__ = ["StagePlan", "plan_curriculum", "format_plan"]


# --------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    """What one stage will cost. Bytes are per GPU; ``None`` where the tokens are unknown."""

    index: int
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq_len: int
    vocab: int
    # parameters
    n_params: int
    n_trainable: int
    n_frozen: int
    generations: dict[int, tuple[float, int]]  # generation -> (lr multiplier, n params)
    # parallelism and batch
    nproc: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    precision: str
    micro_batch: int
    grad_accum: int
    tokens_per_step: int
    activation_checkpointing: object  # "none", "full" or {"every": k} (train.activation_checkpointing)
    # budget
    tokens: int | None  # tokens actually trained (whole optimizer steps)
    tokens_source: str  # "tokens", "epochs x corpus", or "N epochs (corpus size unknown)"
    steps: int | None
    flops_per_token: float
    flops: float | None
    # memory (bytes per GPU)
    memory: MemoryEstimate
    # hardware, time
    gpu: str
    gpu_memory: int
    peak_tflops: float
    mfu: float
    gpus_per_node: int
    nodes: int
    time_s: float | None
    gpu_hours: float | None
    fits: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        d["generations"] = {str(g): {"multiplier": m, "n_params": n} for g, (m, n) in self.generations.items()}
        return d


def _vocab(cfg: CurriculumConfig) -> int:
    if cfg.tokenizer.vocab_size is not None:
        return cfg.tokenizer.vocab_size
    if cfg.tokenizer.path and os.path.isfile(cfg.tokenizer.path):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(cfg.tokenizer.path).get_vocab_size()
    raise ValueError("the vocabulary size is unknown: the config names a tokenizer file that is not there; "
                     "pass vocab=")


def _stage_tokens(stage: StageConfig, tokens_per_step: int,
                  corpus_tokens: Mapping[str, int] | None) -> tuple[int | None, str, int | None]:
    t = stage.train
    if t.tokens is not None:
        source, corpus = "tokens", 0
    elif corpus_tokens is not None and stage.name in corpus_tokens:
        source, corpus = f"{t.epochs:g} epochs x corpus", corpus_tokens[stage.name]
    else:
        return None, f"{t.epochs:g} epochs (corpus size unknown)", None
    steps = t.steps_for(stage.model.seq_len, corpus)  # as train.py: whole optimizer steps
    return steps * tokens_per_step, source, steps


def _fit_warning(plan: StagePlan, gpu: GPU) -> str:
    m = plan.memory
    head = (f"{plan.name}: will not fit: {m.total / GiB:.1f} GiB per {'process' if gpu.host else 'GPU'} "
            f"> {plan.gpu_memory / GiB:.1f} GiB ({gpu.name})")
    tips = []
    if plan.zero_stage < 3 and plan.dp > 1 and plan.pp == 1:
        tips.append(f"zero_stage 3 (model states {(m.model_states + m.buffers) / GiB:.1f} GiB, "
                    f"sharded over dp={plan.dp})")
    if m.dynamic > 0.3 * m.total:
        tips.append(f"larger tp (activations {m.dynamic / GiB:.1f} GiB)")
        if plan.activation_checkpointing == "none":
            tips.append("train.activation_checkpointing: full")
        if plan.micro_batch > 1:
            tips.append(f"micro_batch {max(1, plan.micro_batch // 2)} with grad_accum {plan.grad_accum * 2}")
    else:
        tips.append("larger tp")
    if plan.dp == 1 and plan.zero_stage < 3:
        tips.append("more processes (ZeRO shards only over data-parallel ranks)")
    return f"{head}: suggest " + " / ".join(tips)


def plan_curriculum(cfg: CurriculumConfig, vocab: int | None = None, gpu: str = "h100", mfu: float = 0.4, *,
                    corpus_tokens: Mapping[str, int] | None = None, peak_tflops: float | None = None,
                    overhead_gib: float | None = None) -> list[StagePlan]:
    """Plan every stage of ``cfg`` on ``gpu`` (a key or alias of ``memory.GPUS``).

    ``vocab`` defaults to ``cfg.tokenizer.vocab_size`` (or the size of its tokenizer file; a
    BPE trained on a small corpus may end up smaller, which the trainer then uses).
    ``corpus_tokens`` maps a stage name to its training tokens per epoch (for ``epochs``
    budgets; as ``train.py`` counts them: every source's windows × seq_len).
    ``peak_tflops`` overrides the GPU table's peak (e.g. for ``cpu``), ``overhead_gib`` the
    fixed per-process overhead.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    dev = get_gpu(gpu)
    vocab = _vocab(cfg) if vocab is None else vocab
    models = Plan(cfg, vocab)  # every stage's layout and F multipliers, as the trainer derives them
    overhead = dev.overhead_bytes if overhead_gib is None else overhead_gib * GiB
    plans: list[StagePlan] = []
    for i, stage in enumerate(cfg.stages):
        layout = models.layout(i)
        mults = models.multipliers(i)
        gens: dict[int, list] = {g: [m, 0] for g, m in mults.items()}
        for t in weight_tensors(layout):
            gens[t.generation][1] += t.numel
        n_params = sum(n for _, n in gens.values())
        n_trainable = sum(n for m, n in gens.values() if m > 0)
        t, mc = stage.train, stage.model
        dp = t.dp
        tokens_per_step = t.global_batch_sequences * mc.seq_len  # grad_accum derived from it when set
        tokens, source, steps = _stage_tokens(stage, tokens_per_step, corpus_tokens)
        fpt = flops_per_token(layout, mc.seq_len, mults)  # frozen generations: 4·N
        flops = fpt * tokens if tokens is not None else None
        mem = estimate_memory(layout, mults, seq_len=mc.seq_len, micro_batch=t.micro_batch, precision=t.precision,
                              zero_stage=t.zero_stage, tp=t.tp, pp=t.pp, dp=dp, grad_accum=t.grad_accum,
                              overhead=overhead, lazy_buffers=dev.host, dynamic_factor=dev.dynamic_factor,
                              recompute=t.recompute_interval)
        peak = peak_tflops if peak_tflops is not None else dev.peak_tflops(t.precision)
        res = stage.resources or {}
        gpn = int(res.get("gpus_per_node") or (t.nproc if dev.host else 8))
        nodes = max(1, -(-t.nproc // gpn))
        time_s = flops / (t.nproc * peak * 1e12 * mfu) if flops is not None else None
        have = dev.memory_bytes // min(gpn, t.nproc) if dev.host else dev.memory_bytes
        plan = StagePlan(
            index=i, name=stage.name, layers=mc.layers, hidden=mc.hidden, heads=mc.heads, ffn=mc.ffn,
            seq_len=mc.seq_len, vocab=vocab, n_params=n_params, n_trainable=n_trainable,
            n_frozen=n_params - n_trainable, generations={g: (m, n) for g, (m, n) in gens.items()},
            nproc=t.nproc, tp=t.tp, pp=t.pp, dp=dp, zero_stage=t.zero_stage, precision=t.precision,
            micro_batch=t.micro_batch, grad_accum=t.grad_accum, tokens_per_step=tokens_per_step,
            activation_checkpointing=t.activation_checkpointing,
            tokens=tokens, tokens_source=source, steps=steps, flops_per_token=fpt, flops=flops, memory=mem,
            gpu=dev.name, gpu_memory=have, peak_tflops=peak, mfu=mfu, gpus_per_node=gpn, nodes=nodes,
            time_s=time_s, gpu_hours=time_s * t.nproc / 3600 if time_s is not None else None,
            fits=mem.total <= have,
        )
        if not plan.fits:
            plan.warnings.append(_fit_warning(plan, dev))
        elif mem.total > 0.9 * have:
            plan.warnings.append(f"{stage.name}: tight: {mem.total / GiB:.1f} GiB of {have / GiB:.1f} GiB "
                                 f"(allocator fragmentation may push it over)")
        if res.get("nodes") and int(res["nodes"]) * gpn < t.nproc:
            plan.warnings.append(f"{stage.name}: resources give {res['nodes']} x {gpn} GPUs, "
                                 f"fewer than nproc={t.nproc}")
        if tokens is None:
            plan.warnings.append(f"{stage.name}: {source}: FLOPs and time unknown until the data is prepared")
        plans.append(plan)
    return plans


# --------------------------------------------------------------------------- formatting
# a stage whose tokens are unknown (epochs of data not prepared yet) shows "?"
def _count(x: float | None) -> str:
    return si(x, billion="B", missing="?")


def _flops(x: float | None) -> str:
    return si(x, missing="?")


def _hours(h: float | None) -> str:
    if h is None:
        return "?"
    return f"{h:.2g}" if h < 10 else f"{h:,.0f}"


def _gib(x: float) -> str:  # memory columns: 2 decimals under 10 GiB
    return f"{x / GiB:.2f}" if x < 10 * GiB else f"{x / GiB:.1f}"


def _recompute(ac) -> str:
    return "full" if ac == "full" else f"every {ac['every']} blocks"


def format_plan(plans: Sequence[StagePlan]) -> str:
    """A plain-text table (about 170 columns), totals, warnings and the assumptions."""
    if not plans:
        return "(no stages)"
    head = ["#", "stage", "L x hidden", "params", "trainable", "tokens", "FLOPs", "procs", "tp/pp/dp", "ZeRO",
            "prec", "mb x seq", "weights", "grads", "optim", "activ", "other", "total GiB", "fits", "time", "nodes",
            "GPU-h"]
    rows = []
    for p in plans:
        m = p.memory
        rows.append([
            str(p.index), p.name, f"{p.layers} x {p.hidden}", _count(p.n_params), _count(p.n_trainable),
            _count(p.tokens) if p.tokens is not None else p.tokens_source.split(" (")[0], _flops(p.flops), str(p.nproc),
            f"{p.tp}/{p.pp}/{p.dp}", str(p.zero_stage), p.precision, f"{p.micro_batch} x {p.seq_len}",
            _gib(m.weights), _gib(m.gradients), _gib(m.optimizer), _gib(m.dynamic),
            _gib(m.buffers + m.overhead + m.allocator),
            _gib(m.total), "yes" if p.fits else "NO", duration(p.time_s, missing="?"), str(p.nodes),
            _hours(p.gpu_hours),
        ])
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    left = {1, 2}

    def line(cells):
        return "  ".join(c.ljust(w) if k in left else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    p0 = plans[0]
    out = [f"plan on {p0.gpu} ({p0.gpu_memory / GiB:.1f} GiB per device), MFU {p0.mfu:g}; memory per GPU in GiB", "",
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    known = [p for p in plans if p.flops is not None]
    tot_tokens = sum(p.tokens for p in known)
    tot_flops = sum(p.flops for p in known)
    tot_time = sum(p.time_s for p in known)
    tot_gpuh = sum(p.gpu_hours for p in known)
    partial = "" if len(known) == len(plans) else f" ({len(plans) - len(known)} stage(s) with unknown tokens left out)"
    out += ["", f"total: {_count(tot_tokens)} tokens, {_flops(tot_flops)} FLOPs, {duration(tot_time)} wall, "
                f"{_hours(tot_gpuh)} GPU-hours{partial}"]
    warnings = [w for p in plans for w in p.warnings]
    if warnings:
        out += ["", "warnings:"] + [f"  - {w}" for w in warnings]
    other = "ZeRO reduce bucket + fixed overhead ({:g} GiB)".format(p0.memory.overhead / GiB)
    if any(p.memory.allocator for p in plans):
        other += " + allocator retention (CPU: glibc heaps)"
    out += ["",
            "activ = activations (flash attention; with activation_checkpointing: each group's input + one "
            "group recomputed) + assembled multi-piece weights + loss logits "
            "(+ ZeRO-3 gathers), or the optimizer step's fp32 gradient copy if larger",
            f"other = {other}; formulas: llmagogy_ds/cluster/memory.py"]
    recomputing = [f"{p.name} ({_recompute(p.activation_checkpointing)})" for p in plans
                   if p.activation_checkpointing != "none"]
    if recomputing:
        out.append("activation_checkpointing (activations recomputed in backward): " + ", ".join(recomputing))
    return "\n".join(out)
