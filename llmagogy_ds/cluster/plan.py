"""``llmagogy plan``: what every stage will cost, before anything runs.

For each stage of a curriculum: parameters (total / trainable under the stage's F
multipliers), tokens, FLOPs, memory per GPU, and time and nodes at an assumed MFU on a
GPU kind from :data:`GPUS`. Stages whose memory does not fit the GPU are flagged.

Everything is derived from the config and the generation layout (``layout.stage_layouts``),
exactly as the trainer builds the model; nothing is allocated.

Memory model (bytes per GPU; one pipeline rank, the worst one)
--------------------------------------------------------------

Model states, per parameter this rank holds (after tensor and pipeline splits):

=============  ==========================  ===================  =====================
precision      weights (all params)        gradients            optimizer states
=============  ==========================  ===================  =====================
bf16 / fp16    2                           2  (trainable only)  12 = fp32 master + Adam m, v
fp32           4                           4  (trainable only)  8  = Adam m, v
=============  ==========================  ===================  =====================

A generation whose multiplier is 0 (F = 0) is frozen: ``requires_grad=False`` and no param
group, so it has weights only -- no gradient, no optimizer state (``generations.py``).

ZeRO divides over the data-parallel degree ``dp = nproc / (tp * pp)``: stage 1 the optimizer
states, stage 2 also the gradients, stage 3 also the weights (frozen ones included);
stage 0 replicates everything.

Tensor parallel ``tp`` (Megatron layout) divides the block matrices (attention and FFN) and
the vocab-parallel embedding and LM head by ``tp``; the RMSNorm gains are replicated.
Pipeline parallel ``pp`` gives every rank ``layers / pp`` blocks (the first ``layers % pp``
ranks one more); the first rank also holds the embedding, the last the final norm and the
LM head. Every rank is estimated and the largest is reported.

Activations (what autograd keeps from forward to backward), per layer and per token, for
*this* model (``model.py``: RMSNorm, RoPE, SDPA, SwiGLU), with ``a`` the bytes of the
compute dtype (2 for bf16/fp16, 4 for fp32), ``h`` hidden, ``d = heads * head_dim``,
``f`` the FFN width::

    2 * (4h + 2*a*h)      two RMSNorms: the fp32 residual (x.float(), the residual itself in
                          fp32), the normalised x in compute dtype, and the norm output that the
                          next matmuls keep (replicated across tp: no sequence parallelism)
  + a * 4d / tp           q and k after RoPE, v, and the attention output; SDPA runs a
                          flash / memory-efficient kernel, which keeps no s x s scores
                          (the Korthikanti et al. 2022 ``5*a*s/h`` term does not arise)
  + a * 4f / tp           SwiGLU: w1 out, silu(w1 out), w3 out, their product
  + 8 + 4 * heads / tp    fp32 1/rms of both norms, the attention log-sum-exp

(Korthikanti et al.'s ``34 s b h`` is for GPT-3 blocks with a 4h GeLU MLP and dropout; for
this LLaMA-style block with f = 8/3 h the formula above gives about ``53 s b h`` in bf16.)
Per micro batch: ``micro_batch * seq_len`` tokens times the above, times the layers held,
plus the final norm (``4h + 2ah`` per token). The formula is checked against the bytes that
autograd actually saves (``tests/test_plan.py``, exact to < 1 %).

- Assembled weights: a weight made of several generation pieces is concatenated in every
  forward (``SegmentedMatrix.weight``), and the matmul keeps the concatenated copy for the
  backward, so a grown stage holds one extra copy (compute dtype) of every multi-piece
  weight per micro batch in flight. Stage 0 (single pieces) has none.
- Loss: the fp32 log-softmax over the vocabulary is kept (4 bytes per token per vocab
  entry); at the start of backward its gradient and the logits' gradient exist with it, so
  the peak is ``12 * micro_batch * seq_len * vocab / tp`` bytes.
- Pipeline (1F1B): rank ``r`` keeps ``min(pp - r, grad_accum)`` micro batches in flight,
  so the first rank holds about as many activations as the whole model without pp.
- No activation recomputation (the trainer does not use it).

Other terms:

- ZeRO buffers: DeepSpeed's default ``reduce_bucket_size`` = 5e8 elements in the gradient
  dtype, allocated whole by ZeRO 1-3 (contiguous gradients): 1 GB in bf16, 2 GB in fp32.
  ZeRO-3 also gathers the weights of the module it runs plus a 5e7-element prefetch bucket.
- Optimizer step working set: an fp32 copy of this rank's gradient partition (4 bytes per
  trainable parameter held by the optimizer); it exists when activations have been freed,
  so the peak counts ``max(activations, step working set)``.
- Framework overhead (fixed, per GPU): 2 GiB -- CUDA context and kernels (~0.5-1 GiB),
  cuBLAS / NCCL workspaces and communicator buffers, and caching-allocator slack. On CPU
  the overhead is the process itself (Python, torch, DeepSpeed): 1 GiB.
- CPU only: glibc malloc keeps freed activation memory in its heaps, so the process RSS
  runs above the live bytes (1.1-2.3x the forward/backward working set in the test runs);
  the ``cpu`` kind plans 2.5x (``GPU.dynamic_factor``). A stage is flagged "tight" above 90 %
  of the device memory (GPU allocator fragmentation is not modelled beyond the overhead).

The check (``tests/test_plan.py``): a few fp32 AdamW steps of the tiny config's stages on
CPU, peak RSS above a baseline, within 20 % of this estimate (model states + activations,
without the fixed overhead and ZeRO buffers).

Time: ``FLOPs / (nproc * peak * MFU)`` with ``flops.flops_per_token`` (6·N + attention,
frozen weights included) times the tokens actually trained (whole optimizer steps).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from llmagogy_ds.config import CurriculumConfig, StageConfig
from llmagogy_ds.model.flops import flops_per_token
from llmagogy_ds.model.generations import multipliers
from llmagogy_ds.model.layout import ModelLayout, Shape, stage_layouts, total, weight_specs

__all__ = [
    "GPU", "GPUS", "GPU_ALIASES", "MemoryEstimate", "StagePlan", "get_gpu", "activation_bytes_per_token",
    "estimate_memory", "plan_curriculum", "format_plan", "GiB", "REDUCE_BUCKET_ELEMENTS", "PREFETCH_BUCKET_ELEMENTS",
]

GiB = 1 << 30
MiB = 1 << 20

# DeepSpeed ZeRO defaults (deepspeed.runtime.zero.config): the trainer's ds_config sets neither.
REDUCE_BUCKET_ELEMENTS = 500_000_000
PREFETCH_BUCKET_ELEMENTS = 50_000_000


@dataclass(frozen=True)
class GPU:
    """One accelerator kind: dense peak TFLOPs (no sparsity) and usable memory per device."""

    name: str
    bf16_tflops: float  # also fp16
    fp32_tflops: float  # plain fp32 (no TF32): the trainer's fp32 precision
    memory_bytes: int  # usable, as nvidia-smi reports it
    overhead_bytes: int = 2 * GiB  # fixed framework overhead per process
    host: bool = False  # CPU: the processes of a node share the host's memory
    # RSS / reserved memory per live byte of the forward/backward working set (allocator retention)
    dynamic_factor: float = 1.0

    def peak_tflops(self, precision: str) -> float:
        return self.fp32_tflops if precision == "fp32" else self.bf16_tflops

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * GiB


# Peak dense TFLOPs from the vendors' data sheets; memory as nvidia-smi reports it (MiB).
GPUS: dict[str, GPU] = {
    "h100-sxm": GPU("h100-sxm", 989.0, 67.0, 81559 * MiB),
    "h100-pcie": GPU("h100-pcie", 756.0, 51.0, 81559 * MiB),
    "h200": GPU("h200", 989.0, 67.0, 143771 * MiB),
    "a100-80": GPU("a100-80", 312.0, 19.5, 81920 * MiB),
    "a100-40": GPU("a100-40", 312.0, 19.5, 40960 * MiB),
    "l40s": GPU("l40s", 362.0, 91.6, 46068 * MiB),
    # A CPU process: a small, configurable number (``plan_curriculum(..., peak_tflops=...)``);
    # memory is this machine's RAM, shared by the processes of a node.
    # glibc malloc keeps freed activation memory in its heaps (its mmap threshold grows with the
    # tensors freed), so the process RSS peaked at 1.1-2.3x the live forward/backward bytes in
    # tests/test_plan.py's runs; 2.5x is planned for (MALLOC_MMAP_THRESHOLD_=131072 gives 1.0x).
    "cpu": GPU("cpu", 0.1, 0.1, _host_memory(), overhead_bytes=1 * GiB, host=True, dynamic_factor=2.5),
}
GPU_ALIASES = {"h100": "h100-sxm", "a100": "a100-80", "h100sxm": "h100-sxm", "h100pcie": "h100-pcie",
               "a100-80gb": "a100-80", "a100-40gb": "a100-40", "h200-sxm": "h200", "l40": "l40s"}


def get_gpu(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    key = gpu.strip().lower()
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(f"unknown GPU kind {gpu!r} (known: {', '.join(sorted(GPUS))}; "
                         f"aliases: {', '.join(sorted(GPU_ALIASES))})")
    return GPUS[key]


# --------------------------------------------------------------------------- parameters
@dataclass
class _Tensor:
    numel: int
    generation: int
    kind: str  # "matrix" (block), "norm" (block), "embedding", "head", "final_norm"
    block: int | None  # block index for block tensors
    pieces: int  # how many generation pieces its weight has (>1: concatenated in forward)


def _tensors(layout: ModelLayout) -> list[_Tensor]:
    out = []
    for spec in weight_specs(layout):
        pieces = spec.pieces()
        if spec.name.startswith("blocks."):
            block = int(spec.name.split(".")[1])
            kind = "norm" if spec.role == "norm" else "matrix"
        else:
            block = None
            kind = {"tok_emb": "embedding", "lm_head": "head", "norm": "final_norm"}[spec.name]
        for _, shape, gen in pieces:
            out.append(_Tensor(math.prod(shape), gen, kind, block, len(pieces)))
    return out


def _pp_blocks(n_layers: int, pp: int) -> list[range]:
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for r in range(pp):
        n = base + (1 if r < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


# --------------------------------------------------------------------------- memory
def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def activation_bytes_per_token(hidden: int, attn_width: int, ffn: int, heads: int, precision: str,
                               tp: int = 1) -> float:
    """Bytes autograd keeps per token for one block (see the module docstring)."""
    a = _act_bytes(precision)
    norms = 2 * (4 * hidden + 2 * a * hidden)
    attn = a * 4 * attn_width / tp
    mlp = a * 4 * ffn / tp
    small = 8 + 4 * heads / tp
    return norms + attn + mlp + small


@dataclass
class MemoryEstimate:
    """Bytes per GPU (the worst pipeline rank). ``total`` includes everything below."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # blocks + final norm, all micro batches in flight
    assembled_weights: float  # concatenated multi-piece weights kept for backward
    loss: float  # log-softmax and its gradients at the start of backward
    zero3_gather: float  # ZeRO-3 gathered weights (working set)
    buffers: float  # ZeRO reduce bucket
    step_working_set: float  # fp32 gradient copy at the optimizer step (after activations are freed)
    overhead: float  # fixed framework overhead
    allocator: float = 0.0  # allocator retention beyond the live bytes (CPU: glibc heaps)
    pp_rank: int = 0
    in_flight: int = 1  # micro batches whose activations this rank holds

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def dynamic(self) -> float:
        """What exists only during forward/backward (or only at the optimizer step)."""
        return max(self.activations + self.assembled_weights + self.loss + self.zero3_gather,
                   self.step_working_set)

    @property
    def training(self) -> float:
        """Model states + the forward/backward peak: what the CPU measurement compares with."""
        return self.model_states + self.dynamic

    @property
    def total(self) -> float:
        return self.training + self.buffers + self.overhead + self.allocator


def estimate_memory(layout: ModelLayout, mults: Mapping[int, float], *, seq_len: int, micro_batch: int,
                    precision: str = "bf16", zero_stage: int = 0, tp: int = 1, pp: int = 1, dp: int = 1,
                    grad_accum: int = 1, overhead: float = 2 * GiB, lazy_buffers: bool = False,
                    dynamic_factor: float = 1.0, pp_rank: int | None = None) -> MemoryEstimate:
    """Per-GPU memory of training ``layout`` (see the module docstring for every term).

    ``lazy_buffers``: count the ZeRO reduce bucket only up to the gradients it holds (a CPU
    process never touches the pages of the rest of the bucket). ``dynamic_factor`` adds
    ``(factor - 1) x`` the forward/backward working set as allocator retention (``GPU.dynamic_factor``).
    Returns the pipeline rank that needs the most memory, or rank ``pp_rank`` if given.
    """
    mixed = precision in ("bf16", "fp16")
    wb, gb, ob = (2, 2, 12) if mixed else (4, 4, 8)
    a = _act_bytes(precision)
    tensors = _tensors(layout)
    ranks = _pp_blocks(layout.n_layers, pp)
    tokens = micro_batch * seq_len
    h, hd = layout.d_model, layout.head_dim
    best: MemoryEstimate | None = None
    for r, blocks in enumerate(ranks):
        if pp_rank is not None and r != pp_rank:
            continue
        first, last = r == 0, r == pp - 1
        held_trainable = held_frozen = assembled = 0.0
        module_sizes: dict[tuple, float] = {}
        for t in tensors:
            if t.kind in ("matrix", "norm") and t.block not in blocks:
                continue
            if (t.kind == "embedding" and not first) or (t.kind in ("head", "final_norm") and not last):
                continue
            split = tp if t.kind in ("matrix", "embedding", "head") else 1
            n = t.numel / split
            if mults[t.generation] > 0:
                held_trainable += n
            else:
                held_frozen += n
            if t.pieces > 1 and t.kind != "embedding":  # the embedding's concatenation is not kept
                assembled += n * a
            key = (t.kind, t.block)
            module_sizes[key] = module_sizes.get(key, 0.0) + n
        largest_module = max(module_sizes.values(), default=0.0)
        w_div = dp if zero_stage >= 3 else 1
        g_div = dp if zero_stage >= 2 else 1
        o_div = dp if zero_stage >= 1 else 1
        weights = (held_trainable + held_frozen) * wb / w_div
        grads = held_trainable * gb / g_div
        opt = held_trainable * ob / o_div
        in_flight = min(pp - r, grad_accum) if pp > 1 else 1
        acts = 0.0
        for i in blocks:
            heads, ffn = total(layout.blocks[i].heads), total(layout.blocks[i].ffn)
            acts += activation_bytes_per_token(h, heads * hd, ffn, heads, precision, tp) * tokens
        if last:
            acts += (4 * h + 2 * a * h + 4) * tokens
        acts *= in_flight
        assembled *= in_flight
        loss = 12.0 * tokens * layout.vocab / tp if last else 0.0
        gather = 0.0
        if zero_stage >= 3 and dp > 1:
            full = held_trainable + held_frozen
            gather = min(full, largest_module + PREFETCH_BUCKET_ELEMENTS) * wb
        buffers = 0.0
        if zero_stage >= 1 and dp > 1:
            buffers = REDUCE_BUCKET_ELEMENTS * gb
            if lazy_buffers:
                buffers = min(REDUCE_BUCKET_ELEMENTS, held_trainable) * gb
        step = 4.0 * held_trainable / o_div
        if zero_stage == 0 and dp > 1:  # DeepSpeed flattens gradients for the all-reduce
            step += min(REDUCE_BUCKET_ELEMENTS, held_trainable) * gb
        est = MemoryEstimate(weights, grads, opt, acts, assembled, loss, gather, buffers, step, overhead,
                             pp_rank=r, in_flight=in_flight)
        est.allocator = (dynamic_factor - 1.0) * est.dynamic
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


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

    # the memory terms as plain fields, for tables and JSON
    @property
    def weights_bytes(self) -> float:
        return self.memory.weights

    @property
    def grads_bytes(self) -> float:
        return self.memory.gradients

    @property
    def optimizer_bytes(self) -> float:
        return self.memory.optimizer

    @property
    def activation_bytes(self) -> float:
        """Activations incl. assembled weights, loss and ZeRO-3 gathers (forward/backward peak)."""
        m = self.memory
        return m.activations + m.assembled_weights + m.loss + m.zero3_gather

    @property
    def memory_bytes(self) -> float:
        return self.memory.total

    def to_dict(self) -> dict:
        from dataclasses import asdict

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
    """Plan every stage of ``cfg`` on ``gpu`` (a key or alias of :data:`GPUS`).

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
    st = cfg.stages
    shapes = [Shape(s.model.layers, s.model.hidden, s.model.heads, s.model.ffn) for s in st]
    growth: list[tuple[str, str] | None] = [None] + [(s.growth.depth, s.growth.placement) for s in st[1:]]
    layouts = stage_layouts(shapes, growth, vocab, st[0].model.head_dim)
    freezes = [1.0] + [s.freeze.value for s in st[1:]]
    overhead = dev.overhead_bytes if overhead_gib is None else overhead_gib * GiB
    plans: list[StagePlan] = []
    for i, stage in enumerate(st):
        layout = layouts[i][0]
        mults = multipliers(freezes, i)
        gens: dict[int, list] = {g: [m, 0] for g, m in mults.items()}
        for t in _tensors(layout):
            gens[t.generation][1] += t.numel
        n_params = sum(n for _, n in gens.values())
        n_trainable = sum(n for m, n in gens.values() if m > 0)
        t, mc = stage.train, stage.model
        dp = t.dp
        tokens_per_step = t.micro_batch * t.grad_accum * dp * mc.seq_len
        tokens, source, steps = _stage_tokens(stage, tokens_per_step, corpus_tokens)
        fpt = flops_per_token(layout, mc.seq_len)
        flops = fpt * tokens if tokens is not None else None
        mem = estimate_memory(layout, mults, seq_len=mc.seq_len, micro_batch=t.micro_batch, precision=t.precision,
                              zero_stage=t.zero_stage, tp=t.tp, pp=t.pp, dp=dp, grad_accum=t.grad_accum,
                              overhead=overhead, lazy_buffers=dev.host, dynamic_factor=dev.dynamic_factor)
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
def _si(x: float | None, billion: str = "B") -> str:
    """1.02B (counts: B for billion) or 1.2G (FLOPs: SI prefixes)."""
    if x is None:
        return "?"
    for div, suffix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _hours(h: float | None) -> str:
    if h is None:
        return "?"
    return f"{h:.2g}" if h < 10 else f"{h:,.0f}"


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}" if x < 10 * GiB else f"{x / GiB:.1f}"


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
            str(p.index), p.name, f"{p.layers} x {p.hidden}", _si(p.n_params), _si(p.n_trainable),
            _si(p.tokens) if p.tokens is not None else p.tokens_source.split(" (")[0], _si(p.flops, "G"), str(p.nproc),
            f"{p.tp}/{p.pp}/{p.dp}", str(p.zero_stage), p.precision, f"{p.micro_batch} x {p.seq_len}",
            _gib(m.weights), _gib(m.gradients), _gib(m.optimizer), _gib(m.dynamic),
            _gib(m.buffers + m.overhead + m.allocator),
            _gib(m.total), "yes" if p.fits else "NO", _duration(p.time_s), str(p.nodes),
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
    out += ["", f"total: {_si(tot_tokens)} tokens, {_si(tot_flops, 'G')} FLOPs, {_duration(tot_time)} wall, "
                f"{_hours(tot_gpuh)} GPU-hours{partial}"]
    warnings = [w for p in plans for w in p.warnings]
    if warnings:
        out += ["", "warnings:"] + [f"  - {w}" for w in warnings]
    other = "ZeRO reduce bucket + fixed overhead ({:g} GiB)".format(p0.memory.overhead / GiB)
    if any(p.memory.allocator for p in plans):
        other += " + allocator retention (CPU: glibc heaps)"
    out += ["",
            "activ = activations (no recomputation, flash attention) + assembled multi-piece weights + loss logits "
            "(+ ZeRO-3 gathers), or the optimizer step's fp32 gradient copy if larger",
            f"other = {other}; formulas: llmagogy_ds/plan.py"]
    return "\n".join(out)
