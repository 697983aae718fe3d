"""Activation checkpointing (``train.activation_checkpointing``): groups of blocks keep only
their input in forward and recompute the rest in backward, trading one extra forward of the
blocks for their activations.

``every: k`` cuts the blocks into consecutive groups of ``k`` (``full`` = groups of 1), the
granularity of DeepSpeed's ``PipelineModule(activation_checkpoint_interval=k)``, which the
pipeline uses (``parallel/pipeline.py``: groups of k of a stage's layers). The plain model (pp = 1,
dense or tensor-parallel) gets a ``block_runner`` (``model.gpt.GPT``) that runs each group
under ``torch.utils.checkpoint`` in its non-reentrant form: it needs no input that requires
grad (a frozen generation's embedding output does not), and the generation pieces are
assembled inside the recomputed forward, so their concatenated copies are recomputed too.
The model has no dropout, so recomputation needs no RNG bookkeeping; under tensor parallelism
the recomputed forward repeats the same TP collectives on every rank of the group, in the
same backward order.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from llmagogy_ds.model.gpt import run_blocks


class RecomputeBlocks:
    """A ``GPT.block_runner``: groups of ``every`` blocks, each recomputed in backward."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"activation checkpointing needs groups of >= 1 blocks, got {every}")
        self.every = every

    def __call__(self, blocks, x, cos, sin):
        if not torch.is_grad_enabled():  # evaluation keeps nothing for backward anyway
            return run_blocks(blocks, x, cos, sin)
        for start in range(0, len(blocks), self.every):
            group = blocks[start: start + self.every]
            x = checkpoint(run_blocks, group, x, cos, sin, use_reentrant=False)
        return x


def block_runner(interval: int):
    """The plain model's ``block_runner`` for ``TrainConfig.recompute_interval`` (0: none)."""
    return RecomputeBlocks(interval) if interval else None


__all__ = ["RecomputeBlocks", "block_runner"]
