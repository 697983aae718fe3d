"""FLOPs accounting: 6·N·T for the matmul weights plus attention (PaLM appendix B convention).

N counts every weight that takes part in a matmul (all blocks and the LM head; the
embedding lookup is not a matmul). Frozen generations still cost their forward and
activation-gradient FLOPs, so N is all parameters, not only trainable ones.
Attention adds 12 · layers · seq_len · (heads · head_dim) per token (forward + backward,
the causal mask not discounted, as in PaLM's MFU). Grouped-query attention (``kv_heads``)
shrinks only the k and v projections (kv_heads · head_dim rows, counted in N): scores and
values are computed per query head.

Frozen generations (lr multiplier 0 at the stage's start: ``requires_grad=False``) skip their
weight-gradient matmuls, so their weights cost 4·N·T (forward 2, activation gradient 2), not
6·N·T. The activation gradient is counted for every weight, also where autograd could skip it
(frozen blocks below every trainable one): a slight overcount, never an undercount of the
method's compute. A generation a drift budget slows to 0 mid-stage still computes its weight
gradients (it keeps ``requires_grad``), so it counts 6·N·T. Evaluation is forward only:
2·N + 4 · layers · seq_len · (heads · head_dim) per token (``forward_flops_per_token``),
reported apart from training.
"""
from __future__ import annotations

import math

from llmagogy_ds.model.layout import ModelLayout, n_params, param_generations, param_shapes, total


def matmul_params(layout: ModelLayout) -> int:
    return n_params(layout) - layout.vocab * layout.d_model  # minus the embedding table


def frozen_matmul_params(layout: ModelLayout, mults: dict[int, float]) -> int:
    """Matmul weights of the generations with multiplier 0 (no weight gradient)."""
    gens = param_generations(layout)
    return sum(math.prod(shape) for name, shape in param_shapes(layout).items()
               if mults[gens[name]] == 0 and not name.startswith("tok_emb."))


def _attention(layout: ModelLayout, seq_len: int) -> int:
    """Forward FLOPs per token of the attention scores and the weighted sum (no weights)."""
    return sum(4 * seq_len * total(b.heads) * layout.head_dim for b in layout.blocks)


def flops_per_token(layout: ModelLayout, seq_len: int, mults: dict[int, float] | None = None) -> float:
    """Training FLOPs per token; ``mults`` (lr multiplier per generation): frozen ones count 4·N."""
    frozen = frozen_matmul_params(layout, mults) if mults else 0
    return 6.0 * matmul_params(layout) - 2.0 * frozen + 3 * _attention(layout, seq_len)


def forward_flops_per_token(layout: ModelLayout, seq_len: int) -> float:
    """Forward-only FLOPs per token (evaluation, the growth check)."""
    return 2.0 * matmul_params(layout) + _attention(layout, seq_len)


def mfu(flops_per_second: float, peak_tflops: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation against ``peak_tflops`` per process (None when no peak is set)."""
    if not peak_tflops:
        return None
    return flops_per_second / (peak_tflops * 1e12 * world_size)
