"""LLaMA-style decoder whose weights are stored in generation pieces.

Read it like nanoGPT: RMSNorm → causal self-attention with RoPE → RMSNorm → SwiGLU, with
residual connections, a final RMSNorm and an untied LM head. The only twist is storage:
each weight is a grid of tensors, one per (row segment, column segment) of the layout
(see ``layout.py``), assembled with ``torch.cat`` in forward. A tensor belongs to exactly
one generation, so freezing or slowing a generation acts on whole tensors.

Layout of a block ``blocks.{i}`` (rows × columns; segments along each dimension):

    attn_norm.s{k}          [hidden_k]
    attn.wq|wk|wv.r{a}c{b}  [heads_a * head_dim, hidden_b]   readers of the residual (wk, wv:
                                                             kv heads under grouped-query attention)
    attn.wo.r{a}c{b}        [hidden_a, heads_b * head_dim]   writer into the residual
    ffn_norm.s{k}           [hidden_k]
    ffn.w1|w3.r{a}c{b}      [ffn_a, hidden_b]                readers (gate, up)
    ffn.w2.r{a}c{b}         [hidden_a, ffn_b]                writer (down)

plus ``tok_emb.r0c{b}`` [vocab, hidden_b], ``norm.s{k}`` and ``lm_head.r0c{b}``.
New heads and FFN units are appended after the old ones, so the assembled matrices of a
grown model contain the old ones as their top-left blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmagogy_ds.model.layout import ModelLayout, WeightSpec, weight_specs


class DenseOps:
    """The model's linear algebra in plain torch (one process holds every weight whole).

    Parallelism is applied from outside the model: ``parallel/tensor_parallel.MegatronOps``
    has the same methods over megatron-core's tensor-parallel layers, and the model is built
    with it (``GPT(..., ops=...)``); the model itself never imports ``parallel/``.
    """

    size = 1

    @staticmethod
    def local_shape(_spec, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    @staticmethod
    def mark(_p, _spec) -> None:
        pass

    @staticmethod
    def column(x, w, _spec=None):
        return F.linear(x, w)

    row = column

    @staticmethod
    def embed(idx, w):
        return F.embedding(idx, w)

    @staticmethod
    def token_loss(logits, targets):
        """Per-token next-token loss [B, T]; ``targets == -100`` counts 0 (masked by caller)."""
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                               reduction="none").view(targets.shape)

    @staticmethod
    def full_logits(logits):
        return logits


class SegmentedMatrix(nn.Module):
    """A weight matrix kept as a grid of generation pieces ``r{i}c{j}``.

    Under tensor parallelism the ops hold this rank's slice of every piece
    (``parallel/tensor_parallel.py``) and ``forward`` is the column- or row-parallel linear.
    """

    def __init__(self, spec: WeightSpec, ops=DenseOps()):
        super().__init__()
        self.n_rows = len(spec.rows)
        self.n_cols = len(spec.cols)
        self._linear = ops.row if spec.role == "writer" else ops.column
        for name, shape, gen in spec.pieces():
            p = nn.Parameter(torch.empty(ops.local_shape(spec, shape)))
            p.generation = gen  # read by generations.param_groups
            ops.mark(p, spec)
            self.register_parameter(name, p)

    def weight(self) -> torch.Tensor:
        if self.n_rows == 1 and self.n_cols == 1:
            return self.r0c0  # no copy for a single piece (the dense case)
        rows = [
            torch.cat([getattr(self, f"r{i}c{j}") for j in range(self.n_cols)], dim=1) if self.n_cols > 1
            else getattr(self, f"r{i}c0")
            for i in range(self.n_rows)
        ]
        return torch.cat(rows, dim=0) if self.n_rows > 1 else rows[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.weight())


class SegmentedVector(nn.Module):
    def __init__(self, spec: WeightSpec):
        super().__init__()
        self.n = len(spec.rows)
        for name, shape, gen in spec.pieces():
            p = nn.Parameter(torch.ones(shape))
            p.generation = gen
            self.register_parameter(name, p)

    def weight(self) -> torch.Tensor:
        if self.n == 1:
            return self.s0
        return torch.cat([getattr(self, f"s{i}") for i in range(self.n)])


class RMSNorm(SegmentedVector):
    """RMSNorm with epsilon ``eps × H_0 / H``: one value for every norm of the model.

    Width growth pads the residual with zeros, which divides mean(x²) by H_new/H_old;
    dividing eps by the same factor makes the rescaled gains reproduce the old output
    exactly (``layout.norm_eps_scale``; old runs: per norm, ``layout.per_norm_eps``).
    """

    def __init__(self, spec: WeightSpec, eps: float):
        super().__init__(spec)
        self.eps = eps * spec.eps_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight()


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # [T, hd/2]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, nh, T, hd]; rotate the two halves (GPT-NeoX / LLaMA-HF convention)
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, specs: dict[str, WeightSpec], head_dim: int, ops=DenseOps()):
        super().__init__()
        self.head_dim = head_dim  # this rank's heads: the local rows of wq / head_dim
        self.wq, self.wk, self.wv, self.wo = (SegmentedMatrix(specs[k], ops) for k in ("wq", "wk", "wv", "wo"))

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # grouped-query attention: query head i reads kv head i // (q heads / kv heads), here and
        # on every TP rank (each rank holds whole groups: layout.BlockLayout.group)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, specs: dict[str, WeightSpec], ops=DenseOps()):
        super().__init__()
        self.w1, self.w3, self.w2 = (SegmentedMatrix(specs[k], ops) for k in ("w1", "w3", "w2"))

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, specs: dict[str, WeightSpec], head_dim: int, eps: float, ops=DenseOps()):
        super().__init__()
        self.attn_norm = RMSNorm(specs["attn_norm"], eps)
        self.attn = Attention(specs, head_dim, ops)
        self.ffn_norm = RMSNorm(specs["ffn_norm"], eps)
        self.ffn = SwiGLU(specs, ops)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


def block_specs(layout: ModelLayout) -> tuple[list[dict[str, WeightSpec]], dict[str, WeightSpec]]:
    """The weight specs of every block (by short name) and of the top-level weights."""
    specs = weight_specs(layout)
    by_block: list[dict[str, WeightSpec]] = [dict() for _ in layout.blocks]
    for s in specs:
        if s.block is not None:
            by_block[s.block][s.name.rsplit(".", 1)[-1]] = s  # wq, attn_norm, w2, ...
    return by_block, {s.name: s for s in specs if s.block is None}


def run_blocks(blocks, x, cos, sin):
    """The blocks in order: the model's default ``block_runner`` (activation checkpointing hands
    in another one from ``parallel/recompute.py``)."""
    for blk in blocks:
        x = blk(x, cos, sin)
    return x


def next_token_loss(ops, logits, targets, reduction: str = "mean"):
    """Mean (or per-token, ``reduction="none"``) loss; ``targets == -100`` are ignored."""
    tok = ops.token_loss(logits, targets)
    if reduction == "none":
        return tok
    return tok.sum() / (targets != -100).sum().clamp(min=1)


class GPT(nn.Module):
    """The decoder. ``forward(idx, targets)`` returns the mean next-token loss.

    ``ops`` (default ``DenseOps``) does the linear algebra; ``parallel/tensor_parallel.py``
    hands in megatron-core's tensor-parallel ops to build this rank's slice, and the
    pipeline-parallel model (``parallel/pipeline.py``) reuses these modules. ``block_runner``
    (default ``run_blocks``) runs the blocks; ``parallel/recompute.py`` hands in one that
    recomputes their activations in backward (``train.activation_checkpointing``).
    """

    def __init__(self, layout: ModelLayout, seq_len: int, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 ops=None, block_runner=None):
        super().__init__()
        self.layout = layout
        self.seq_len = seq_len
        ops = ops or DenseOps()
        by_block, top = block_specs(layout)
        self.tok_emb = SegmentedMatrix(top["tok_emb"], ops)
        self._embed = ops.embed
        self.blocks = nn.ModuleList(Block(b, layout.head_dim, norm_eps, ops) for b in by_block)
        self.norm = RMSNorm(top["norm"], norm_eps)
        self.lm_head = SegmentedMatrix(top["lm_head"], ops)
        self.ops = ops
        self.block_runner = block_runner or run_blocks
        cos, sin = rope_tables(seq_len, layout.head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states [B, T, hidden]: what the LM head reads (a probe's features)."""
        T = idx.shape[1]
        dtype = self.norm.s0.dtype
        cos, sin = self.rope_cos[:T].to(dtype), self.rope_sin[:T].to(dtype)
        x = self._embed(idx, self.tok_emb.weight())
        return self.norm(self.block_runner(self.blocks, x, cos, sin))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        logits = self.lm_head(self.hidden(idx))  # under TP: this rank's vocab slice
        if targets is None:
            return self.ops.full_logits(logits)
        return next_token_loss(self.ops, logits, targets, reduction)


def fresh_init(layout: ModelLayout, init_std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights of a model trained from scratch (GPT-2 style: writers scaled by 1/sqrt(2L))."""
    out: dict[str, torch.Tensor] = {}
    writer_std = init_std / math.sqrt(2 * max(1, layout.n_layers))
    for spec in weight_specs(layout):
        for name, shape, _ in spec.pieces():
            if spec.role == "norm":
                t = torch.ones(shape)
            else:
                std = writer_std if spec.role == "writer" else init_std
                t = torch.randn(shape, generator=generator) * std
            out[f"{spec.name}.{name}"] = t
    return out


__all__ = ["GPT", "DenseOps", "SegmentedMatrix", "SegmentedVector", "RMSNorm", "fresh_init"]
