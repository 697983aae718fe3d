"""Width growth by cloning, in the manner of HyperCloning (Samragh et al., 2024): pure maths on
assembled weights, called by ``growth.grow_state_dict`` for ``growth.init: clone``.

Every width (residual ``hidden``, attention heads, key/value heads, FFN units) grows by an
integer factor k: the grown model holds k copies of every old unit, appended after the old
ones as the layout's new segment, so the generation pieces are the same as with padding.

* the residual stream becomes ``[x, x, …, x] / sqrt(k_h)``: the embedding's columns and the
  writers' (``wo``, ``w2``) rows are repeated and divided by sqrt(k_h). mean(x'²) is then
  mean(x²)/k_h, and so is the model's one RMSNorm epsilon (``norm_eps × H_0 / H``,
  ``layout.norm_eps_scale``), so every RMSNorm returns ``[y, y, …, y]`` with its gains simply
  repeated: the normalised statistics are unchanged;
* a weight that reads cloned inputs (readers of the residual, the LM head, writers reading
  cloned heads or FFN units) has its columns repeated and divided by the factor of that
  input: k copies of W/k read k copies of the input, so the sum is the old output;
* units (heads, FFN units) are repeated whole, so query head i still reads kv head
  i // group (grouped-query attention) and attention and SwiGLU give repeated outputs;
* symmetry: identical copies would get identical gradients and stay copies for ever, so each
  pair of input-side copies gets noise +n and −n (an odd copy out gets none): the copies'
  sum, hence the function, is unchanged, yet every copy differs and gets its own gradient.

The old pieces change value under cloning (divided, scaled, noised), so unlike padding they
are not the old weights any more; a frozen generation (F = 0) keeps these grown values.
"""
from __future__ import annotations

import math

import torch

from llmagogy_ds.model.layout import WeightSpec, total

NOISE = 0.1  # the symmetry-breaking noise's std, as a fraction of the model's init_std


def factor(old: int, new: int, what: str) -> int:
    """The integer factor a width grows by under cloning; ValueError when it is not one."""
    if old <= 0 or new % old:
        raise ValueError(f"growth.init clone needs integer width multiples: {what} grows from {old} to {new}")
    return new // old


def paired_noise(full: torch.Tensor, cols_old: int, k: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """Add +n to input-side copy 2p and −n to copy 2p+1 (columns ``cols_old`` wide each)."""
    for p in range(k // 2):
        n = torch.randn(full.shape[0], cols_old, generator=gen) * std
        full[:, 2 * p * cols_old: (2 * p + 1) * cols_old] += n
        full[:, (2 * p + 1) * cols_old: (2 * p + 2) * cols_old] -= n
    return full


def clone_widen(old_full: torch.Tensor, old: WeightSpec, new: WeightSpec, k_hidden: int, noise_std: float,
                gen: torch.Generator) -> torch.Tensor:
    """The assembled grown matrix (or vector) of one kept weight under cloning (module doc)."""
    if new.cols is None:  # RMSNorm gain: repeated; the statistics it scales are unchanged
        return old_full.repeat(factor(total(old.rows), total(new.rows), new.name))
    k_r = factor(total(old.rows), total(new.rows), f"{new.name} rows")
    k_c = factor(total(old.cols), total(new.cols), f"{new.name} columns")
    full = old_full.repeat(k_r, k_c)
    if new.role == "embedding":  # writes the residual: its copies carry 1/sqrt(k_h)
        return full / math.sqrt(k_hidden)
    full = full / k_c  # every other weight reads its columns: k_c copies of W/k_c
    if new.role == "writer":
        full = full / math.sqrt(k_hidden)
    return paired_noise(full, old_full.shape[1], k_c, noise_std, gen)


__all__ = ["factor", "paired_noise", "clone_widen", "NOISE"]
