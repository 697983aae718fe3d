"""Growth operators: pure functions from the previous stage's weights to the grown ones.

``grow_state_dict`` takes a full (unsharded) state dict of the previous layout and returns
the state dict of the grown layout (see ``layout.grow_layout``). Old tensors keep their
names and values; only new tensors (new generation) are created, except the RMSNorm
gains, which are rescaled by sqrt(H_old / H_new) when the residual widens.

Function preservation (default, ``depth: identity``):

* the residual's new dimensions stay exactly zero: new embedding columns are zero, and
  every writer into the residual (attention ``wo``, FFN ``w2``) has zero rows there for
  old units. Zero padding H → H' divides mean(x²) by H'/H, so RMSNorm's output on the
  old dimensions is sqrt(H'/H) × the old one when epsilon is divided by H'/H too: the
  model's one epsilon is ``norm_eps × H_0 / H`` (``layout.norm_eps_scale``), and the
  gains × sqrt(H/H') give the old output exactly. Nothing else changes: the residual
  stream keeps its values (rescaling it by sqrt(H'/H) instead — embeddings and writers
  × c, epsilon fixed — is exact too, but changes every trained writer and its moments);
* readers of the residual (q/k/v, gate/up, LM head) get random columns for the new
  dimensions (they read zeros, so they change nothing);
* new units (heads, FFN units, whole new blocks) must add nothing to the residual. With
  ``init: zero`` their output weights are zero. With ``init: mirror`` (default) new units
  come in *twins*: identical input weights, output weights v and −v, so their
  contributions cancel exactly, yet every tensor (input side too) gets a gradient on the
  first step, where zero output weights would leave the input side without one until the
  second step. An odd unit out gets zero output weights. Under grouped-query attention the
  attention's unit is a whole group (``WeightSpec.group`` query heads and their kv head):
  twin groups read identical q, k and v rows, so their outputs cancel too.

``depth: stack`` copies trained blocks (after widening) instead; it is not
function-preserving. ``depth: gstack`` (G_stack, Du et al. 2024) stacks copies of the whole
trained stack on top of it (integer depth multiples); not function-preserving either.

``init: clone`` widens by cloning (HyperCloning; ``cloning.py``): exactly function-preserving,
but it changes the old pieces' values; new blocks at the same transition get ``mirror`` twins.
"""
from __future__ import annotations

import math
import zlib

import torch

from llmagogy_ds.model.cloning import NOISE, clone_widen, factor
from llmagogy_ds.model.layout import BlockOrigin, ModelLayout, WeightSpec, total, weight_specs


def _twin(t: torch.Tensor, n_units: int, unit: int, dim: int, sign: float) -> torch.Tensor:
    """Make unit ``u + k`` equal ``sign`` × unit ``u`` (k = n_units // 2) along ``dim``.

    With sign = −1 an odd unit out is zeroed, so the twins' summed output is exactly zero.
    """
    k = n_units // 2
    t = t.clone()
    first = t.narrow(dim, 0, k * unit)
    t.narrow(dim, k * unit, k * unit).copy_(first * sign)
    if sign < 0 and n_units % 2:
        t.narrow(dim, 2 * k * unit, unit).zero_()
    return t


def _split(full: torch.Tensor, spec: WeightSpec) -> dict[str, torch.Tensor]:
    """Cut an assembled matrix/vector into the spec's pieces."""
    out = {}
    if spec.cols is None:
        off = 0
        for name, shape, _ in spec.pieces():
            out[name] = full[off: off + shape[0]].clone()
            off += shape[0]
        return out
    r_off = 0
    for i, r in enumerate(spec.rows):
        c_off = 0
        rh = r.size * spec.row_unit
        for j, c in enumerate(spec.cols):
            cw = c.size * spec.col_unit
            out[f"r{i}c{j}"] = full[r_off: r_off + rh, c_off: c_off + cw].clone()
            c_off += cw
        r_off += rh
    return out


def _assemble(pieces: dict[str, torch.Tensor], spec: WeightSpec) -> torch.Tensor:
    if spec.cols is None:
        return torch.cat([pieces[f"s{i}"] for i in range(len(spec.rows))])
    return torch.cat(
        [torch.cat([pieces[f"r{i}c{j}"] for j in range(len(spec.cols))], dim=1) for i in range(len(spec.rows))],
        dim=0,
    )


def assemble(sd: dict[str, torch.Tensor], layout: ModelLayout) -> dict[str, torch.Tensor]:
    """Every weight of ``layout`` whole (``{spec name: matrix or vector}``) from its pieces."""
    return {w.name: _assemble({n: sd[f"{w.name}.{n}"] for n, _, _ in w.pieces()}, w) for w in weight_specs(layout)}


def split(full: dict[str, torch.Tensor], layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The inverse of ``assemble``: whole weights cut into ``layout``'s generation pieces."""
    return {f"{w.name}.{n}": t.contiguous() for w in weight_specs(layout) for n, t in _split(full[w.name], w).items()}


def _widen(old_full: torch.Tensor, old: WeightSpec, new: WeightSpec, init: str, std: float,
           writer_std: float, gen: torch.Generator) -> torch.Tensor:
    """The assembled grown matrix: old values top-left, new rows/columns per the rules above."""
    if new.cols is None:  # RMSNorm gain: rescale for the zero-padded wider residual
        h_old, h_new = old_full.numel(), total(new.rows)
        scale = math.sqrt(h_old / h_new)
        return torch.cat([old_full * scale, torch.full((h_new - h_old,), scale)])
    R, C = total(new.rows) * new.row_unit, total(new.cols) * new.col_unit
    r0, c0 = old_full.shape
    full = torch.zeros(R, C)
    full[:r0, :c0] = old_full
    if new.role in ("reader", "head"):
        # new columns read the (zero) new residual dims: random, harmless
        full[:r0, c0:] = torch.randn(r0, C - c0, generator=gen) * std
        if R > r0:  # new units' input weights, twinned over whole rows (GQA: whole groups of heads)
            rows = torch.randn(R - r0, C, generator=gen) * std
            if init == "mirror":
                unit = new.row_unit * new.group
                rows = _twin(rows, (R - r0) // unit, unit, 0, +1.0)
            full[r0:] = rows
    elif new.role == "writer" and C > c0:
        # new units' output weights: twins cancel (mirror) or zero; rows of new residual
        # dims for old units stay zero so the new dims remain exactly zero
        if init == "mirror":
            cols = torch.randn(R, C - c0, generator=gen) * writer_std
            unit = new.col_unit * new.group
            full[:, c0:] = _twin(cols, (C - c0) // unit, unit, 1, -1.0)
    # embedding: new columns zero (the residual's new dims start at zero)
    return full


def _fresh_block_weight(spec: WeightSpec, init: str, std: float, writer_std: float,
                        gen: torch.Generator) -> torch.Tensor:
    """A new identity block's weight (single piece): random readers, cancelling writers."""
    if spec.cols is None:
        return torch.ones(total(spec.rows))
    R, C = total(spec.rows) * spec.row_unit, total(spec.cols) * spec.col_unit
    if spec.role == "reader":
        w = torch.randn(R, C, generator=gen) * std
        unit = spec.row_unit * spec.group
        return _twin(w, R // unit, unit, 0, +1.0) if init == "mirror" else w
    if init == "zero":
        return torch.zeros(R, C)
    w = torch.randn(R, C, generator=gen) * writer_std
    unit = spec.col_unit * spec.group
    return _twin(w, C // unit, unit, 1, -1.0)


def _old_name(spec: WeightSpec, origins: list[BlockOrigin]) -> str | None:
    """The name a kept weight had in the previous layout; None for new blocks."""
    if spec.block is None:
        return spec.name
    o = origins[spec.block].old
    return None if o is None else spec.name_in_block(o)


def grow_moments(prev: dict[str, dict[str, torch.Tensor]], prev_layout: ModelLayout, layout: ModelLayout,
                 origins: list[BlockOrigin], init: str = "mirror",
                 only: set[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Adam moments of the grown model: old pieces keep theirs, new pieces start at zero.

    Growth keeps every old piece under its name (and values) except RMSNorm gains, which are
    multiplied by c = sqrt(H_old/H_new); the gradient w.r.t. c·g is grad/c, so their first
    moment is divided by c and the second by c². Pieces without state (frozen) stay absent.
    Width cloning (``init: clone``) rescales every old piece and its gradient, so its old
    moments would mislead Adam: every piece starts at zero then. ``only``: the grown pieces to
    make (a rank's own); ``prev`` may be any mapping (a memory-mapped file's).
    """
    if init == "clone" and _widths(prev_layout) != _widths(layout):
        return {}
    c = math.sqrt(total(prev_layout.hidden) / total(layout.hidden))
    out = {}
    for w in weight_specs(layout):
        old = _old_name(w, origins)
        if old is None:
            continue
        for n, _, _ in w.pieces():
            src = f"{old}.{n}"
            if (only is not None and f"{w.name}.{n}" not in only) or src not in prev:
                continue
            st = prev[src]
            if w.role == "norm":  # the gains growth rescales (_widen)
                st = {"exp_avg": st["exp_avg"] / c, "exp_avg_sq": st["exp_avg_sq"] / c ** 2}
            out[f"{w.name}.{n}"] = {k: v.clone() for k, v in st.items()}
    return out


def _spec_gen(seed: int, name: str) -> torch.Generator:
    """The generator of one grown weight: its draws depend on the seed and its name only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63)


def _stack_source(spec: WeightSpec, origins: list[BlockOrigin]) -> str:
    """The widened trained weight a stacked new block's weight copies."""
    copy_of = origins[spec.block].copy_of
    return spec.name_in_block(next(j for j, o in enumerate(origins) if o.old == copy_of))


def grow_state_dict(
    prev: dict[str, torch.Tensor],
    prev_layout: ModelLayout,
    layout: ModelLayout,
    origins: list[BlockOrigin],
    *,
    depth: str = "identity",
    init: str = "mirror",
    init_std: float = 0.02,
    seed: int = 0,
    only: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Grow ``prev`` (weights of ``prev_layout``) into ``layout``; pure, deterministic in ``seed``.

    ``only``: the weights (spec names) to make, each the same as in the whole grown state dict
    (every weight draws from its own generator), so that each rank grows just the part it holds;
    ``prev`` then needs only their sources (any mapping: a memory-mapped file's tensors)."""
    if init not in ("mirror", "zero", "clone"):
        raise ValueError(f"growth.init must be 'mirror', 'zero' or 'clone', got {init!r}")
    writer_std = init_std / math.sqrt(2 * layout.n_layers)
    if init == "clone":  # checked before any weight is made; new blocks get mirror twins
        k_hidden = factor(total(prev_layout.hidden), total(layout.hidden), "hidden")
        for a, b in zip(_widths(prev_layout), _widths(layout)):
            factor(a, b, "heads, kv heads or ffn")
    prev_specs = {s.name: s for s in weight_specs(prev_layout)}
    new_specs = weight_specs(layout)
    want = None if only is None else set(only) | {
        _stack_source(s, origins) for s in new_specs
        if s.name in only and depth in ("stack", "gstack") and _old_name(s, origins) is None
        and origins[s.block].copy_of is not None}

    # 1) widen kept weights (old blocks and the embedding / final norm / head)
    full: dict[str, torch.Tensor] = {}
    for spec in new_specs:
        src = _old_name(spec, origins)
        if src is None or (want is not None and spec.name not in want):
            continue
        gen = _spec_gen(seed, spec.name)
        ospec = prev_specs[src]
        old_full = _assemble({n: prev[f"{src}.{n}"].float() for n, _, _ in ospec.pieces()}, ospec)
        full[spec.name] = (clone_widen(old_full, ospec, spec, k_hidden, NOISE * init_std, gen) if init == "clone"
                           else _widen(old_full, ospec, spec, init, init_std, writer_std, gen))

    # 2) new blocks: identity (cancelling) or a copy of a widened trained block
    for spec in new_specs:
        if spec.name in full or (want is not None and spec.name not in want):
            continue
        gen = _spec_gen(seed, spec.name)
        copy_of = origins[spec.block].copy_of
        if depth in ("stack", "gstack") and copy_of is not None:
            full[spec.name] = full[_stack_source(spec, origins)].clone()
        else:
            full[spec.name] = _fresh_block_weight(spec, "mirror" if init == "clone" else init, init_std,
                                                  writer_std, gen)

    out: dict[str, torch.Tensor] = {}
    for spec in new_specs:
        if only is not None and spec.name not in only:
            continue
        for n, t in _split(full[spec.name], spec).items():
            out[f"{spec.name}.{n}"] = t.contiguous()
    return out


def _widths(layout: ModelLayout) -> tuple[int, ...]:
    """hidden, heads, kv heads and FFN units of a layout (what cloning multiplies)."""
    b = layout.blocks[0] if layout.blocks else None
    return (layout.d_model,) + ((total(b.heads), total(b.kv), total(b.ffn)) if b else ())


def preserves_function(depth: str, init: str) -> bool:
    """Whether a growth is exact by construction: copying trained blocks (stack, gstack) is not."""
    return depth == "identity" and init in ("mirror", "zero", "clone")


def grow_through(sd: dict[str, torch.Tensor], layouts, upto: int, **kw) -> dict[str, torch.Tensor]:
    """Grow stage-0 weights through every transition up to ``upto`` (``layouts`` as from
    ``layout.stage_layouts``); transition t uses seed t unless ``seed`` is given."""
    seed = kw.pop("seed", None)
    for t in range(1, upto + 1):
        sd = grow_state_dict(sd, layouts[t - 1][0], *layouts[t], seed=t if seed is None else seed + t, **kw)
    return sd


__all__ = ["grow_state_dict", "grow_through", "grow_moments", "assemble", "split", "preserves_function"]
