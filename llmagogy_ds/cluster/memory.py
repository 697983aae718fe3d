"""What one stage needs per GPU: the accelerator table and the memory model of ``llmagogy plan``
(``cluster/plan.py`` adds tokens, FLOPs, time and the table).

Everything is derived from the generation layout (``layout.weight_specs``), exactly as the
trainer builds the model; nothing is allocated.

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
  + a * (2d + 2d_kv) / tp q and k after RoPE, v, and the attention output (d_kv = kv heads x
                          head_dim under grouped-query attention, else d); SDPA runs a
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
- Activation checkpointing (``train.activation_checkpointing``, ``parallel/recompute.py``):
  with groups of ``k`` blocks (``full``: k = 1) a rank keeps only each group's input
  (``a * h`` per token, per micro batch in flight) plus, during a group's backward, that one
  group's activations and assembled weights, recomputed (``recomputed``; it lives after the
  loss terms are freed, so the peak counts the larger of the two). The final norm stays. (The pipeline's groups are of a stage's layers, the embedding and head included;
  counted as blocks.)

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
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

from llmagogy_ds.model.layout import ModelLayout, total, weight_specs

__all__ = [
    "GPU", "GPUS", "GPU_ALIASES", "MemoryEstimate", "WeightTensor", "get_gpu", "weight_tensors",
    "activation_bytes_per_token", "estimate_memory", "GiB", "REDUCE_BUCKET_ELEMENTS", "PREFETCH_BUCKET_ELEMENTS",
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
class WeightTensor:
    """One parameter tensor (a generation piece of a weight), as the memory model sees it."""

    numel: int
    generation: int
    kind: str  # "matrix" (block), "norm" (block), "embedding", "head", "final_norm"
    block: int | None  # block index for block tensors
    pieces: int  # how many generation pieces its weight has (>1: concatenated in forward)


# the kind of a top-level weight (not in a block) by its role
_TOP_KIND = {"embedding": "embedding", "head": "head", "norm": "final_norm"}


def weight_tensors(layout: ModelLayout) -> list[WeightTensor]:
    out = []
    for spec in weight_specs(layout):
        pieces = spec.pieces()
        if spec.block is not None:
            kind = "norm" if spec.role == "norm" else "matrix"
        else:
            kind = _TOP_KIND[spec.role]
        for _, shape, gen in pieces:
            out.append(WeightTensor(math.prod(shape), gen, kind, spec.block, len(pieces)))
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
                               tp: int = 1, kv_width: int | None = None) -> float:
    """Bytes autograd keeps per token for one block (see the module docstring); ``kv_width``:
    kv heads x head_dim under grouped-query attention (default: ``attn_width``)."""
    a = _act_bytes(precision)
    norms = 2 * (4 * hidden + 2 * a * hidden)
    attn = a * (2 * attn_width + 2 * (attn_width if kv_width is None else kv_width)) / tp
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
    recomputed: float = 0.0  # activation checkpointing: one group's activations + assembled weights, in backward

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def dynamic(self) -> float:
        """What exists only during forward/backward (or only at the optimizer step)."""
        # a recomputed group lives after the loss's backward has freed the loss terms
        return max(self.activations + self.assembled_weights + max(self.loss, self.recomputed) + self.zero3_gather,
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
                    dynamic_factor: float = 1.0, pp_rank: int | None = None, recompute: int = 0) -> MemoryEstimate:
    """Per-GPU memory of training ``layout`` (see the module docstring for every term).

    ``lazy_buffers``: count the ZeRO reduce bucket only up to the gradients it holds (a CPU
    process never touches the pages of the rest of the bucket). ``dynamic_factor`` adds
    ``(factor - 1) x`` the forward/backward working set as allocator retention (``GPU.dynamic_factor``).
    Returns the pipeline rank that needs the most memory, or rank ``pp_rank`` if given.
    ``recompute``: activation checkpointing's blocks per group (0: none; module docstring).
    """
    mixed = precision in ("bf16", "fp16")
    wb, gb, ob = (2, 2, 12) if mixed else (4, 4, 8)
    a = _act_bytes(precision)
    tensors = weight_tensors(layout)
    ranks = _pp_blocks(layout.n_layers, pp)
    tokens = micro_batch * seq_len
    h, hd = layout.d_model, layout.head_dim
    best: MemoryEstimate | None = None
    for r, blocks in enumerate(ranks):
        if pp_rank is not None and r != pp_rank:
            continue
        first, last = r == 0, r == pp - 1
        held_trainable = held_frozen = assembled = 0.0
        assembled_in: dict[int, float] = {}  # per block: its concatenated multi-piece weights
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
                if t.block is None:
                    assembled += n * a
                else:
                    assembled_in[t.block] = assembled_in.get(t.block, 0.0) + n * a
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
        per_block = {}
        for i in blocks:
            b = layout.blocks[i]
            heads, ffn = total(b.heads), total(b.ffn)
            per_block[i] = activation_bytes_per_token(h, heads * hd, ffn, heads, precision, tp,
                                                      total(b.kv) * hd) * tokens
        final = (4 * h + 2 * a * h + 4) * tokens if last else 0.0
        recomputed = 0.0
        if recompute:  # each group keeps its input; one group's activations live again in its backward
            groups = [list(blocks)[k: k + recompute] for k in range(0, len(blocks), recompute)]
            acts = in_flight * (len(groups) * a * h * tokens + final)
            assembled *= in_flight
            recomputed = max((sum(per_block[i] + assembled_in.get(i, 0.0) for i in g) for g in groups), default=0.0)
        else:
            acts = in_flight * (sum(per_block.values()) + final)
            assembled = in_flight * (assembled + sum(assembled_in.values()))
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
                             pp_rank=r, in_flight=in_flight, recomputed=recomputed)
        est.allocator = (dynamic_factor - 1.0) * est.dynamic
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best
