"""Tensor parallelism over generation pieces, with megatron-core's tensor-parallel layers.

The model keeps one tensor per generation piece (``layout.py``). Under TP each piece is
partitioned on its own along the TP dimension, so a generation's pieces stay whole tensors
on every rank (one DeepSpeed param group per generation, frozen ones hold no state):

* readers of the residual (wq, wk, wv, w1, w3) and the LM head: rows split
  (column-parallel; whole heads / FFN units / vocab rows per rank);
* writers into the residual (wo, w2): columns split (row-parallel);
* the token embedding: vocab rows split (vocab-parallel);
* RMSNorm gains: replicated.

Rank r holds chunk r of every piece, so the assembled local matrix is rank r's slice of
every segment, and the readers' local output units line up with the writers' local input
units. Each generation's added heads, kv heads (grouped-query attention), FFN units and the
vocab must divide by tp; then every rank holds whole GQA groups (query head i of a rank reads
its kv head i // group, as on one process).

The maths is megatron-core's: ``ColumnParallelLinear`` (``skip_weight_param_allocation``:
the weight is our assembled pieces), and for the row-parallel writer and the embedding the
same mappings their megatron layers run (``RowParallelLinear``/``VocabParallelEmbedding``
own their weight as one Parameter, which would put all generations in one tensor), then
``vocab_parallel_cross_entropy``. At tp = 1 every mapping is the identity and the model
uses ``torch.nn.functional`` directly (``model.gpt.DenseOps``); the tests check tp = 2 against tp = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmagogy_ds.config import tp_split_errors
from llmagogy_ds.model.gpt import DenseOps
from llmagogy_ds.model.layout import weight_specs

# which dimension of a piece is split, by weight role (layout.WeightSpec.role)
PARTITION_DIM = {"reader": 0, "head": 0, "embedding": 0, "writer": 1, "norm": None}


def partition_dim(spec) -> int | None:
    return PARTITION_DIM[spec.role]


def local_shape(shape: tuple[int, ...], dim: int | None, tp: int) -> tuple[int, ...]:
    if dim is None or tp == 1:
        return tuple(shape)
    if shape[dim] % tp:
        raise ValueError(f"dimension {dim} of a piece of shape {tuple(shape)} does not divide by tp={tp}")
    return tuple(s // tp if d == dim else s for d, s in enumerate(shape))


def piece_partition_dims(layout) -> dict[str, int | None]:
    """State-dict name of every piece → the dimension TP splits (None: replicated)."""
    return {f"{w.name}.{n}": partition_dim(w) for w in weight_specs(layout) for n, _, _ in w.pieces()}


def shard_state_dict(full: dict[str, torch.Tensor], layout, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s TP slice of a full (unsharded) state dict (any subset of the pieces)."""
    if tp == 1:
        return full
    dims = piece_partition_dims(layout)
    return {k: v if dims[k] is None else v.chunk(tp, dim=dims[k])[rank].clone() for k, v in full.items()}


def merge_shards(shards: list[dict[str, torch.Tensor]], layout) -> dict[str, torch.Tensor]:
    """Full state dict from every TP rank's slice (rank order)."""
    if len(shards) == 1:
        return dict(shards[0])
    dims = piece_partition_dims(layout)
    return {k: shards[0][k] if dims[k] is None else torch.cat([s[k] for s in shards], dim=dims[k])
            for k in shards[0]}


def check_divisible(layout, tp: int) -> list[str]:
    """Why ``layout`` cannot be split ``tp`` ways (empty when it can)."""
    if tp == 1:
        return []
    errs = [f"vocabulary size {layout.vocab} does not divide by tp={tp}"] if layout.vocab % tp else []
    added = {}  # heads and FFN units are the split dimensions of every piece
    for blk in layout.blocks:
        for what, segs in (("heads", blk.heads), ("kv heads", blk.kv_heads), ("FFN units", blk.ffn)):
            for seg in segs:
                added.setdefault((f"generation {seg.gen}", seg.size, what), None)
    return errs + tp_split_errors(added, tp)


def universal_checkpoint_info(layout, trainable: set[str] | None = None) -> dict:
    """The TP slicing DeepSpeed's ``ds_to_universal`` needs to merge TP shards: writers are
    concatenated along dim 1, norm gains are replicated, everything else along dim 0.

    ``ds_to_universal`` refuses a pattern that matches no parameter it converts (only the
    trainable ones are), so a pattern is listed only when some trainable piece matches it.
    """
    import re

    from deepspeed.checkpoint.constants import (PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                                                TP_REPLICATED_PARAMETER_PATTERNS)

    names = set(piece_partition_dims(layout)) if trainable is None else trainable
    patterns = {TP_REPLICATED_PARAMETER_PATTERNS: r".*(attn_norm|ffn_norm|norm)\.s\d+$",
                PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: r".*\.(wo|w2)\.r\d+c\d+$"}
    # the pipeline's names ("{layer}.…") match the same patterns
    return {key: [pat] for key, pat in patterns.items() if any(re.match(pat, n) for n in names)}


class MegatronOps:
    """tp > 1: megatron-core's tensor-parallel layers and mappings over the TP group."""

    def __init__(self, tp: int):
        from megatron.core import ModelParallelConfig, parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("tp > 1 needs megatron-core's parallel_state (parallel.topology.init_model_parallel)")
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError(f"model built for tp={tp}, parallel_state has "
                               f"tp={parallel_state.get_tensor_model_parallel_world_size()}")
        self.size = tp
        self.rank = parallel_state.get_tensor_model_parallel_rank()
        self.config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                          perform_initialization=False, gradient_accumulation_fusion=False)
        self._column: dict[tuple[int, int], object] = {}

    def _column_layer(self, out_full: int, in_size: int):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        key = (out_full, in_size)
        if key not in self._column:  # weightless: the pieces are passed in at forward
            self._column[key] = ColumnParallelLinear(in_size, out_full, config=self.config, init_method=None,
                                                     bias=False, gather_output=False,
                                                     skip_weight_param_allocation=True)
        return self._column[key]

    def local_shape(self, spec, shape: tuple[int, ...]) -> tuple[int, ...]:
        """This rank's slice of a piece of ``spec``."""
        return local_shape(shape, partition_dim(spec), self.size)

    def mark(self, p: torch.nn.Parameter, spec) -> None:
        """megatron's TP attributes: DeepSpeed counts a replicated gain once in the grad norm."""
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        dim = partition_dim(spec)
        set_tensor_model_parallel_attributes(p, dim is not None, 0 if dim is None else dim, 1)

    def column(self, x, w, _spec=None):
        return self._column_layer(w.shape[0] * self.size, w.shape[1])(x, weight=w)[0]

    def row(self, x, w, _spec=None):
        # RowParallelLinear.forward with input_is_parallel, no bias, no sequence parallel
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(F.linear(x, w))

    def embed(self, idx, w):
        # VocabParallelEmbedding.forward: look up this rank's vocab rows, zero the others, all-reduce
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        start = self.rank * w.shape[0]
        outside = (idx < start) | (idx >= start + w.shape[0])
        local = (idx - start).masked_fill(outside, 0)
        out = F.embedding(local, w).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out)

    def token_loss(self, logits, targets):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        ignore = targets == -100
        loss = vocab_parallel_cross_entropy(logits.float(), targets.masked_fill(ignore, 0))
        return loss.masked_fill(ignore, 0.0)

    def full_logits(self, logits):
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        return gather_from_tensor_model_parallel_region(logits)


def ops_for(tp: int):
    """The model's ops for ``tp``: plain torch at 1, megatron-core's TP layers above."""
    return DenseOps() if tp == 1 else MegatronOps(tp)


__all__ = ["partition_dim", "local_shape", "shard_state_dict", "merge_shards", "check_divisible",
           "universal_checkpoint_info", "ops_for", "MegatronOps", "piece_partition_dims"]
