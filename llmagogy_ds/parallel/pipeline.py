"""Pipeline parallelism: the model as DeepSpeed ``PipelineModule`` layers.

The layers are the model's own modules (``model.py``): the token embedding, every block,
and the final norm + LM head, each possibly tensor-parallel. ``PipelineModule`` names a
parameter ``{layer}.{name in layer}``: layer 0 is the embedding, layer i+1 is block i, the
last layer the head. ``pipe_name`` / ``canonical_name`` map these to the layout's names, so
growth, evaluation and checkpoint conversion keep working on the canonical state dict.

The LM head is untied from the embedding (as in the rest of the model), so there is no tied
layer to synchronise across stages. Stages are balanced by parameter count.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from llmagogy_ds.model.gpt import Block, RMSNorm, SegmentedMatrix, block_specs, next_token_loss, rope_tables
from llmagogy_ds.parallel.tensor_parallel import ops_for


class EmbedLayer(nn.Module):
    def __init__(self, layout, tp: int):
        super().__init__()
        ops = ops_for(tp)
        self.tok_emb = SegmentedMatrix(block_specs(layout)[1]["tok_emb"], ops)
        self._embed = ops.embed

    def forward(self, idx):
        return self._embed(idx, self.tok_emb.weight())


class BlockLayer(Block):
    """A block with its own RoPE tables (a pipeline layer takes one tensor in, one out)."""

    def __init__(self, layout, i: int, seq_len: int, rope_theta: float, norm_eps: float, tp: int):
        super().__init__(block_specs(layout)[0][i], layout.head_dim, norm_eps, ops_for(tp))
        cos, sin = rope_tables(seq_len, layout.head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        T = x.shape[1]
        return super().forward(x, self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype))


class HeadLayer(nn.Module):
    def __init__(self, layout, norm_eps: float, tp: int):
        super().__init__()
        top = block_specs(layout)[1]
        ops = ops_for(tp)
        self.norm = RMSNorm(top["norm"], norm_eps)
        self.lm_head = SegmentedMatrix(top["lm_head"], ops)

    def forward(self, x):
        return self.lm_head(self.norm(x))


class PipeLoss:
    """The pipeline's loss_fn: mean next-token loss in training; in evaluation (``sums``)
    the (sum, count) of the token losses, so padded held-out batches average exactly."""

    def __init__(self, tp: int):
        self.ops = ops_for(tp)
        self.sums = False

    def __call__(self, logits, targets):
        if self.sums:
            tok = next_token_loss(self.ops, logits, targets, "none")
            return torch.stack([tok.double().sum(), (targets != -100).sum().double()])
        return next_token_loss(self.ops, logits, targets)


def pipeline_module(layout, model_cfg, tp: int, topo, recompute: int = 0):
    """The ``PipelineModule`` of a layout on ``topo`` (tp × pp × dp); ``recompute`` > 0: activation
    checkpointing of groups of that many of a stage's layers (``parallel/recompute.py``), in
    DeepSpeed's non-reentrant form (a group's input need not require grad: the token ids, or a
    frozen generation's output)."""
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layers = [LayerSpec(EmbedLayer, layout, tp)]
    layers += [LayerSpec(BlockLayer, layout, i, model_cfg.seq_len, model_cfg.rope_theta, model_cfg.norm_eps, tp)
               for i in range(layout.n_layers)]
    layers.append(LayerSpec(HeadLayer, layout, model_cfg.norm_eps, tp))
    loss = PipeLoss(tp)
    module = PipelineModule(layers=layers, loss_fn=loss,
                            topology=PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp),
                            partition_method="parameters", activation_checkpoint_interval=recompute,
                            activation_checkpoint_func=non_reentrant_checkpoint)
    module.pipe_loss = loss
    return module


_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_LAYER = re.compile(r"^(\d+)\.(.*)$")


def pipe_name(name: str, n_layers: int) -> str:
    """Canonical (layout) parameter name → the PipelineModule's name."""
    m = _BLOCK.match(name)
    if m:
        return f"{int(m.group(1)) + 1}.{m.group(2)}"
    if name.startswith("tok_emb."):
        return f"0.{name}"
    return f"{n_layers + 1}.{name}"  # norm.*, lm_head.*


def canonical_name(name: str, n_layers: int) -> str:
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"not a pipeline parameter name: {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    if layer == 0 or layer == n_layers + 1:
        return rest
    return f"blocks.{layer - 1}.{rest}"


def canonical_state(module: nn.Module, n_layers: int | None) -> dict[str, torch.Tensor]:
    """This rank's parameters under their layout names (pipeline or plain model)."""
    sd = module.state_dict()  # megatron's layers are not submodules here: no _extra_state entries
    if n_layers is None:
        return sd
    return {canonical_name(k, n_layers): v for k, v in sd.items()}


__all__ = ["pipeline_module", "pipe_name", "canonical_name", "canonical_state", "PipeLoss"]
