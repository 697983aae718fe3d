"""FLOPs accounting: 6·N·T for the matmul weights plus attention (PaLM appendix B convention).

N counts every weight that takes part in a matmul (all blocks and the LM head; the
embedding lookup is not a matmul). Frozen generations still cost their forward and
activation-gradient FLOPs, so N is all parameters, not only trainable ones.
Attention adds 12 · layers · seq_len · (heads · head_dim) per token (forward + backward,
the causal mask not discounted, as in PaLM's MFU).
"""
from __future__ import annotations

from llmagogy_ds.model.layout import ModelLayout, n_params, total


def matmul_params(layout: ModelLayout) -> int:
    return n_params(layout) - layout.vocab * layout.d_model  # minus the embedding table


def flops_per_token(layout: ModelLayout, seq_len: int) -> float:
    attn = sum(12 * seq_len * total(b.heads) * layout.head_dim for b in layout.blocks)
    return 6.0 * matmul_params(layout) + attn


def mfu(flops_per_second: float, peak_tflops: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation against ``peak_tflops`` per process (None when no peak is set)."""
    if not peak_tflops:
        return None
    return flops_per_second / (peak_tflops * 1e12 * world_size)
