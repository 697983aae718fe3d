"""Generation layout: which stage (generation) added which slice of every weight.

A model grows in two ways between stages:

* **width** — the residual stream (``hidden``), the attention heads (and, under grouped-query
  attention, the key/value heads ``kv_heads``, in a fixed ratio) and the FFN gain new
  units. Every dimension of a block is therefore a list of *segments* ``Seg(size, gen)``,
  appended in the order the stages added them (old units first, so indices stay stable).
* **depth** — new blocks are inserted; a block born at stage ``t`` starts with one segment
  per dimension, all of generation ``t``.

A weight matrix whose rows and columns are segmented is stored as a grid of tensors,
one per (row segment, column segment); the tensor ``r{i}c{j}`` belongs to generation
``max(rows[i].gen, cols[j].gen)``. A vector (RMSNorm gain) is stored as one tensor per
segment, ``s{i}``. So every parameter tensor belongs to exactly one generation, and the
freeze coefficient F can act on whole tensors (one DeepSpeed param group per generation).

The layout is a pure function of the curriculum config up to a stage (``stage_layouts``):
every rank, the growth operators and the checkpoint loaders derive the same one.

RMSNorm epsilon: width growth pads the residual with zeros, which divides mean(x²) by
H_new/H_old, so an exactly function-preserving growth divides epsilon by the same factor.
Every norm of a model uses one epsilon, ``norm_eps × H_0 / H`` (``H_0``: the stage-0 width),
so a grown model is a standard LLaMA with one ``rms_norm_eps`` (``model_norm_eps``). Runs
grown before that rule kept each norm's epsilon in units of the width *it* was born with
(``norm_eps × H_born / H``); their layouts carry ``per_norm_eps=True`` and load unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Seg:
    """A contiguous slice of one dimension, added by generation ``gen``."""

    size: int
    gen: int


def total(segs: Sequence[Seg]) -> int:
    return sum(s.size for s in segs)


def _extend(segs: list[Seg], new_total: int, gen: int) -> list[Seg]:
    grow = new_total - total(segs)
    return segs + [Seg(grow, gen)] if grow > 0 else list(segs)


@dataclass(frozen=True)
class BlockLayout:
    """One transformer block: the segments of its residual, head and FFN dimensions."""

    born: int
    hidden: tuple[Seg, ...]
    heads: tuple[Seg, ...]  # in units of heads (head_dim fixed for the whole curriculum)
    ffn: tuple[Seg, ...]
    kv_heads: tuple[Seg, ...] = ()  # grouped-query attention's key/value heads; () = one per query head

    @property
    def kv(self) -> tuple[Seg, ...]:
        return self.kv_heads or self.heads

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA; 1 = plain multi-head attention). The same in every
        generation (``grow_layout``), so query head i reads kv head i // group, as in Hugging Face."""
        return total(self.heads) // total(self.kv)


@dataclass(frozen=True)
class ModelLayout:
    vocab: int
    head_dim: int
    generation: int  # the stage this layout trains in
    hidden: tuple[Seg, ...]  # embedding columns, final norm, lm_head columns
    blocks: tuple[BlockLayout, ...]
    per_norm_eps: bool = False  # a run grown before one-epsilon norms (module doc): eps × H_born / H

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return total(self.hidden)

    @property
    def n_heads(self) -> int:
        return total(self.blocks[0].heads) if self.blocks else 0

    @property
    def d_ffn(self) -> int:
        return total(self.blocks[0].ffn) if self.blocks else 0

    @property
    def n_kv_heads(self) -> int:
        return total(self.blocks[0].kv) if self.blocks else 0


@dataclass(frozen=True)
class Shape:
    """The model shape a stage asks for (subset of the stage's model config)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    kv_heads: int | None = None  # None: = heads (no grouped-query attention)

    @property
    def kv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads


def _kv_segs(shape: Shape, gen: int) -> tuple[Seg, ...]:
    return () if shape.kv == shape.heads else (Seg(shape.kv, gen),)


@dataclass(frozen=True)
class BlockOrigin:
    """Where block ``i`` of a grown layout comes from.

    ``old`` is the index in the previous layout for kept blocks; for new blocks ``old`` is
    None and ``copy_of`` names the (already widened) old block a ``stack`` growth copies.
    """

    old: int | None
    copy_of: int | None = None


def initial_layout(shape: Shape, vocab: int, head_dim: int, per_norm_eps: bool = False) -> ModelLayout:
    if shape.heads % shape.kv:
        raise ValueError(f"heads {shape.heads} must be a multiple of kv_heads {shape.kv}")
    blk = BlockLayout(0, (Seg(shape.hidden, 0),), (Seg(shape.heads, 0),), (Seg(shape.ffn, 0),), _kv_segs(shape, 0))
    return ModelLayout(vocab, head_dim, 0, (Seg(shape.hidden, 0),), tuple([blk] * shape.layers), per_norm_eps)


def insertion_slots(n_old: int, n_new: int, placement: str) -> list[int]:
    """For each new block, the number of old blocks below it.

    ``interleave`` spreads the new blocks evenly between old ones (each right above the old
    block at ``m * n_old // n_new``), ``top`` puts them above, ``bottom`` below.
    """
    if placement == "top":
        return [n_old] * n_new
    if placement == "bottom":
        return [0] * n_new
    if placement == "interleave":
        return [(m * n_old) // n_new + 1 for m in range(n_new)] if n_old else [0] * n_new
    raise ValueError(f"unknown placement {placement!r}")


def grow_layout(
    prev: ModelLayout, shape: Shape, gen: int, depth: str, placement: str
) -> tuple[ModelLayout, list[BlockOrigin]]:
    """Layout of generation ``gen`` grown from ``prev``; width first, then depth."""
    if shape.hidden != shape.heads * prev.head_dim:
        raise ValueError("hidden must equal heads * head_dim")
    # GQA: new query heads form new groups with new kv heads, so old heads keep their kv head
    # and query head i reads kv head i // group in every generation (growth stays exact)
    if prev.blocks and (shape.heads % shape.kv or shape.heads // shape.kv != prev.blocks[0].group):
        raise ValueError(f"heads / kv_heads must stay {prev.blocks[0].group} (the previous stage's), "
                         f"got {shape.heads} / {shape.kv}")
    widened = [
        replace(
            b,
            hidden=tuple(_extend(list(b.hidden), shape.hidden, gen)),
            heads=tuple(_extend(list(b.heads), shape.heads, gen)),
            ffn=tuple(_extend(list(b.ffn), shape.ffn, gen)),
            kv_heads=tuple(_extend(list(b.kv), shape.kv, gen)) if b.kv_heads else (),
        )
        for b in prev.blocks
    ]
    n_old, n_new = len(widened), shape.layers - len(widened)
    if n_new < 0:
        raise ValueError("depth cannot shrink")
    if depth == "gstack":  # G_stack: whole copies of the trained stack, on top of it, in order
        if n_old and n_new % n_old:
            raise ValueError(f"growth.depth gstack needs an integer depth multiple: {n_old} -> {shape.layers} layers")
        placement = "top"
    slots = insertion_slots(n_old, n_new, placement)
    fresh = BlockLayout(gen, (Seg(shape.hidden, gen),), (Seg(shape.heads, gen),), (Seg(shape.ffn, gen),),
                        _kv_segs(shape, gen))
    blocks: list[BlockLayout] = []
    origins: list[BlockOrigin] = []
    new_by_slot: dict[int, list[int]] = {}
    for m, s in enumerate(slots):
        new_by_slot.setdefault(s, []).append(m)
    for pos in range(n_old + 1):
        for m in new_by_slot.get(pos, []):
            copy_of = None
            if depth in ("stack", "gstack") and n_old:
                copy_of = _stack_source(m, n_new, n_old, pos, placement)
            blocks.append(fresh)
            origins.append(BlockOrigin(None, copy_of))
        if pos < n_old:
            blocks.append(widened[pos])
            origins.append(BlockOrigin(pos))
    hidden = tuple(_extend(list(prev.hidden), shape.hidden, gen))
    return ModelLayout(prev.vocab, prev.head_dim, gen, hidden, tuple(blocks), prev.per_norm_eps), origins


def _stack_source(m: int, n_new: int, n_old: int, slot: int, placement: str) -> int:
    """Which trained block a ``stack`` growth copies into new block ``m``."""
    if placement == "interleave":
        return slot - 1  # the block right below
    if placement == "top":
        return (n_old - n_new + m) % n_old  # repeat the top blocks in order
    return m % n_old  # bottom: repeat the bottom blocks in order


def stage_layouts(
    shapes: Sequence[Shape], growth: Sequence[tuple[str, str]], vocab: int, head_dim: int, per_norm_eps: bool = False
) -> list[tuple[ModelLayout, list[BlockOrigin] | None]]:
    """Layouts of every stage; ``growth[t]`` = (depth, placement) of the transition into t."""
    first = initial_layout(shapes[0], vocab, head_dim, per_norm_eps)
    out: list[tuple[ModelLayout, list[BlockOrigin] | None]] = [(first, None)]
    for t in range(1, len(shapes)):
        depth, placement = growth[t]
        out.append(grow_layout(out[-1][0], shapes[t], t, depth, placement))
    return out


def matrix_pieces(rows: Iterable[Seg], cols: Iterable[Seg], row_unit: int = 1, col_unit: int = 1):
    """(name, shape, generation) of every tensor of a segmented matrix."""
    cols = list(cols)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            yield f"r{i}c{j}", (r.size * row_unit, c.size * col_unit), max(r.gen, c.gen)


def vector_pieces(segs: Iterable[Seg]):
    for i, s in enumerate(segs):
        yield f"s{i}", (s.size,), s.gen


@dataclass(frozen=True)
class WeightSpec:
    """One segmented weight of the model: its rows, columns and their units."""

    name: str  # module path, e.g. "blocks.3.attn.wq"
    rows: tuple[Seg, ...]
    cols: tuple[Seg, ...] | None  # None for vectors
    row_unit: int = 1
    col_unit: int = 1
    born: int = 0
    role: str = "matrix"  # reader | writer | embedding | norm | head (growth init rules)
    unit_dim: str | None = None  # "rows"/"cols": which side counts heads/FFN units
    block: int | None = None  # the block it belongs to; None for tok_emb, the final norm and lm_head
    eps_scale: float = 1.0  # a norm's epsilon is norm_eps × eps_scale (module doc)
    group: int = 1  # GQA: wq rows / wo columns come in groups of this many heads (mirror twins whole groups)

    def pieces(self):
        if self.cols is None:
            return list(vector_pieces(self.rows))
        return list(matrix_pieces(self.rows, self.cols, self.row_unit, self.col_unit))

    def name_in_block(self, i: int) -> str:
        """The name of this block weight in block ``i`` (growth renumbers and copies blocks);
        the ``blocks.{i}.`` naming is ``weight_specs``'s, so it is read back only here."""
        if self.block is None:
            raise ValueError(f"{self.name} is not a block weight")
        return f"blocks.{i}.{self.name.split('.', 2)[2]}"


def norm_eps_scale(layout: ModelLayout, segs: Sequence[Seg]) -> float:
    """The factor on ``norm_eps`` of a norm over ``segs``: H_0/H (one epsilon per model), or
    H_born/H for a layout with ``per_norm_eps`` (each norm in units of its own birth width)."""
    return (segs[0].size if layout.per_norm_eps else layout.hidden[0].size) / total(segs)


def model_norm_eps(layout: ModelLayout, norm_eps: float) -> float:
    """The one RMSNorm epsilon of a model of ``layout`` (``rms_norm_eps`` of the standard LLaMA
    it is); a ``per_norm_eps`` layout whose norms disagree has none (ValueError)."""
    eps = {norm_eps * s.eps_scale for s in weight_specs(layout) if s.role == "norm"}
    if len(eps) > 1:
        listed = ", ".join(f"{e:.4g}" for e in sorted(eps))
        raise ValueError(f"this model's RMSNorms have {len(eps)} different epsilons ({listed}): it was grown "
                         "before one-epsilon norms (per_norm_eps), so it is not a standard LLaMA")
    return eps.pop()


def weight_specs(layout: ModelLayout) -> list[WeightSpec]:
    """Every segmented weight of a layout, in module order (the model mirrors this)."""
    V, hd = ((Seg(layout.vocab, 0),), layout.head_dim)
    specs = [WeightSpec("tok_emb", V, layout.hidden, role="embedding")]
    for i, b in enumerate(layout.blocks):
        p = f"blocks.{i}"
        e = norm_eps_scale(layout, b.hidden)
        specs.append(WeightSpec(f"{p}.attn_norm", b.hidden, None, born=b.born, role="norm", block=i, eps_scale=e))
        g = b.group
        specs.append(WeightSpec(f"{p}.attn.wq", b.heads, b.hidden, hd, 1, b.born, "reader", "rows", i, group=g))
        for w in ("wk", "wv"):
            specs.append(WeightSpec(f"{p}.attn.{w}", b.kv, b.hidden, hd, 1, b.born, "reader", "rows", i))
        specs.append(WeightSpec(f"{p}.attn.wo", b.hidden, b.heads, 1, hd, b.born, "writer", "cols", i, group=g))
        specs.append(WeightSpec(f"{p}.ffn_norm", b.hidden, None, born=b.born, role="norm", block=i, eps_scale=e))
        for w in ("w1", "w3"):
            specs.append(WeightSpec(f"{p}.ffn.{w}", b.ffn, b.hidden, 1, 1, b.born, "reader", "rows", i))
        specs.append(WeightSpec(f"{p}.ffn.w2", b.hidden, b.ffn, 1, 1, b.born, "writer", "cols", i))
    specs.append(WeightSpec("norm", layout.hidden, None, role="norm", eps_scale=norm_eps_scale(layout, layout.hidden)))
    specs.append(WeightSpec("lm_head", V, layout.hidden, role="head"))
    return specs


def param_generations(layout: ModelLayout) -> dict[str, int]:
    """State-dict name of every parameter tensor → the generation that added it."""
    return {f"{w.name}.{n}": g for w in weight_specs(layout) for n, _, g in w.pieces()}


def param_shapes(layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    return {f"{w.name}.{n}": s for w in weight_specs(layout) for n, s, _ in w.pieces()}


def n_params(layout: ModelLayout) -> int:
    return sum(math.prod(shape) for shape in param_shapes(layout).values())


__all__ = [
    "Seg", "BlockLayout", "ModelLayout", "Shape", "BlockOrigin", "WeightSpec",
    "initial_layout", "grow_layout", "stage_layouts", "weight_specs", "param_generations",
    "param_shapes", "n_params", "total", "insertion_slots", "norm_eps_scale", "model_norm_eps",
]
