"""One optimizer step of the global batch, for a DeepSpeed engine (the trainer) or a plain model
and optimizer in one process (the size search): the same data split, the same accumulation."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from llmagogy_ds.data.corpus import BlendedSampler


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def elastic_split(train, world: int, zero_stage: int | None = None):
    """The stage's TrainConfig for ``world`` data-parallel ranks, same global batch.

    The global batch is the config's ``global_batch`` when the stage states it, else
    micro_batch × grad_accum × (nproc / (tp·pp)). On another world size (other nodes, or another
    tp/pp at restart) the gradient accumulation (else the micro batch) absorbs the difference.
    """
    if zero_stage is not None:
        train = replace(train, zero_stage=zero_stage)
    global_batch = train.global_batch_sequences
    if world == train.dp and train.micro_batch * train.grad_accum * world == global_batch:
        return train
    if global_batch % (train.micro_batch * world) == 0:
        return replace(train, grad_accum=global_batch // (train.micro_batch * world))
    if global_batch % world == 0:
        return replace(train, micro_batch=global_batch // world, grad_accum=1)
    raise ValueError(f"global batch {global_batch} sequences (train.global_batch or micro_batch × grad_accum × dp) "
                     f"cannot be split over {world} ranks; run on a world size that divides it")


def micro_batches(sampler: BlendedSampler, samples: int, micro_batch: int, grad_accum: int, rank: int, dp: int,
                  device):
    """This data-parallel rank's micro-batches of the global batch starting at ``samples``.

    Rank r takes samples ``r * micro_batch`` on of each micro-step's ``micro_batch * dp``, so
    the global batch is the same set of samples for any split into ranks × micro-steps.
    (TP and pipeline peers share a data-parallel rank, hence the same batches.)
    """
    for micro in range(grad_accum):
        x, y = sampler.batch(samples + micro * micro_batch * dp + rank * micro_batch, micro_batch)
        yield torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def _is_pipeline(engine) -> bool:
    if isinstance(engine, LocalEngine):
        return False  # and no DeepSpeed import (slow, and it logs) for the size search's one process
    from llmagogy_ds.parallel import model_parallel as MP

    return MP.is_pipeline(engine)


def train_step(engine, sampler: BlendedSampler, samples: int, micro_batch: int, grad_accum: int, rank: int,
               dp: int) -> torch.Tensor:
    """One optimizer step; returns the sum of the micro-batch losses."""
    batches = micro_batches(sampler, samples, micro_batch, grad_accum, rank, dp, engine.device)
    if _is_pipeline(engine):  # DeepSpeed's pipeline schedule runs every micro-batch
        return engine.train_batch(batches).detach().reshape(1) * grad_accum
    loss_acc = torch.zeros(1, device=engine.device)
    for x, y in batches:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        loss_acc += loss.detach()
    return loss_acc


class LocalEngine:
    """The part of DeepSpeed's engine ``train_step`` uses, for one process without DeepSpeed:
    each micro-batch's loss is scaled by 1/accumulation, gradients are clipped and the optimizer
    and scheduler step at the accumulation boundary."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, grad_accum: int, grad_clip: float):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.device = next(model.parameters()).device
        self._micro = 0
        self._params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, x, y):
        return self.module(x, y)

    def backward(self, loss) -> None:
        (loss * (1 / self.grad_accum)).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


__all__ = ["rng_state", "set_rng_state", "elastic_split", "micro_batches", "train_step", "LocalEngine"]
