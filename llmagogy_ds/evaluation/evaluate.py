"""Held-out loss and automatically checked exams.

Exam items are (prompt, answer); the answer is followed by a newline. An item is passed
when every answer token (newline included) is the model's arg-max given the prompt and
the answer's earlier tokens: teacher-forced exact match, which is the same as greedy
decoding producing exactly the answer, computed in one batched forward pass.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist


@torch.no_grad()
def heldout_loss(model, windows: np.ndarray, batch: int = 16, device="cpu", shard: bool = False,
                 part: tuple[int, int] | None = None) -> float:
    """Mean next-token loss over fixed held-out windows; ``shard`` splits them over ranks,
    ``part=(i, n)`` into n parts of which this rank takes part i (tensor-parallel peers share
    a part; their duplicate sums cancel in the all-reduced mean)."""
    was_training = model.training
    model.eval()
    distributed = (shard or part is not None) and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = windows[part[0]::part[1]] if part is not None else windows[rank::world]
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch):
        chunk = torch.from_numpy(mine[i: i + batch]).to(device)
        loss = model(chunk[:, :-1], chunk[:, 1:], reduction="none")
        total[0] += loss.double().sum().cpu()
        total[1] += loss.numel()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] else math.nan


def encode_item(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt+answer+newline and the index of the first answer token."""
    text = prompt + answer + "\n"
    enc = tokenizer.encode(text)
    first = next((i for i, (s, _) in enumerate(enc.offsets) if s >= len(prompt)), len(enc.ids))
    # a token straddling the boundary counts as part of the answer
    for i, (s, e) in enumerate(enc.offsets):
        if s < len(prompt) < e:
            first = i
            break
    return enc.ids, first


@torch.no_grad()
def exam_accuracy(model, tokenizer, items: list[dict], seq_len: int, batch: int = 32, device="cpu") -> dict:
    """Exact-match accuracy overall and per kind."""
    was_training = model.training
    model.eval()
    encoded = [encode_item(tokenizer, it["prompt"], it["answer"]) for it in items]
    correct = []
    for i in range(0, len(encoded), batch):
        chunk = encoded[i: i + batch]
        L = min(seq_len, max(len(ids) for ids, _ in chunk))
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            ids = ids[-L:] if len(ids) > L else ids
            x[r, : len(ids)] = torch.tensor(ids)
        pred = model(x.to(device)).argmax(-1).cpu()
        for r, (ids, first) in enumerate(chunk):
            cut = max(0, len(ids) - L)
            ids_t = torch.tensor(ids[cut:])
            a = max(1, first - cut)
            correct.append(bool((pred[r, a - 1: len(ids_t) - 1] == ids_t[a:]).all()))
    model.train(was_training)
    out = {"accuracy": float(np.mean(correct)) if correct else math.nan, "n": len(correct)}
    kinds = sorted({it.get("kind", "all") for it in items})
    if len(kinds) > 1:
        out["by_kind"] = {k: float(np.mean([c for c, it in zip(correct, items) if it.get("kind", "all") == k]))
                          for k in kinds}
    return out
