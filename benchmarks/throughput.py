"""Throughput benchmarks (one process, all cores):

1. llmagogy's training step (DeepSpeed engine, generation param groups, GenerationLR, the
   blended memmap sampler: ``train.train_step``) ÷ a minimal plain-PyTorch loop (same model,
   same batch size, torch AdamW, batches already in memory). Goal ≥ 0.95.
2. The generation-piece layout (a model grown over 3 stages: many tensors per weight,
   assembled with torch.cat in forward) ÷ a dense model of the same shape. Goal ≤ 5% slower.

    python benchmarks/throughput.py [--steps 30] [--out docs/benchmarks]

Writes throughput.json and throughput.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmagogy_ds.config import TrainConfig
from llmagogy_ds.data.corpus import BlendedSampler, StageData
from llmagogy_ds.model.generations import GenerationLR, multipliers, param_groups
from llmagogy_ds.model.growth import grow_through
from llmagogy_ds.model.layout import Shape, initial_layout, n_params, param_generations, stage_layouts
from llmagogy_ds.model.gpt import GPT, fresh_init
from llmagogy_ds.parallel.engine import initialize
from llmagogy_ds.parallel.rendezvous import init_distributed
from llmagogy_ds.train.step import train_step

VOCAB, HD = 512, 16
SHAPES = [Shape(2, 64, 4, 176), Shape(4, 96, 6, 256), Shape(6, 128, 8, 344)]  # configs/tiny.yaml


def grown_model(seq: int) -> GPT:
    layouts = stage_layouts(SHAPES, [None] + [("identity", "interleave")] * 2, VOCAB, HD)
    sd = grow_through(fresh_init(layouts[0][0], 0.02, torch.Generator().manual_seed(0)), layouts, 2)
    m = GPT(layouts[2][0], seq)
    m.load_state_dict(sd)
    return m


def dense_model(seq: int) -> GPT:
    lay = initial_layout(SHAPES[-1], VOCAB, HD)
    m = GPT(lay, seq)
    m.load_state_dict(fresh_init(lay, 0.02, torch.Generator().manual_seed(0)))
    return m


def timed(step, steps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def plain_loop(model: GPT, batch: int, seq: int, steps: int) -> float:
    """Tokens/s of the minimal loop: forward, backward, clip, AdamW step on in-memory batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (steps + 5, batch, seq + 1), generator=g)
    it = iter(range(steps + 5))

    def step():
        xy = data[next(it)]
        loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return steps * batch * seq / timed(step, steps)


def fake_stage_data(root: Path, tokens: int, seq: int) -> StageData:
    rng = np.random.default_rng(0)
    for which in ("train", "heldout"):
        rng.integers(0, VOCAB, tokens, dtype=np.uint16).tofile(root / f"src0.{which}.bin")
    meta = {"stage": "bench", "dtype": "uint16", "sources": [
        {"path": "bench", "weight": 1.0, "train": "src0.train.bin", "heldout": "src0.heldout.bin",
         "train_tokens": tokens, "heldout_tokens": tokens}]}
    (root / "meta.json").write_text(json.dumps(meta))
    return StageData.load(root)


def llmagogy_loop(model: GPT, batch: int, seq: int, steps: int, zero_stage: int) -> float:
    layout = model.layout
    groups = param_groups(model, param_generations(layout), multipliers([1.0, 1.0, 1.0], 2), 0.1)
    train = TrainConfig(lr=1e-3, micro_batch=batch, zero_stage=zero_stage, weight_decay=0.1, tokens=1)
    engine, _, _ = initialize(model, groups, train, lambda opt: GenerationLR(opt, 1e-3, steps + 5, 2))
    with tempfile.TemporaryDirectory() as d:
        sampler = BlendedSampler(fake_stage_data(Path(d), (steps + 6) * batch * (seq + 1), seq), seq, 0)
        samples = iter(range(0, (steps + 5) * batch, batch))
        return steps * batch * seq / timed(lambda: train_step(engine, sampler, next(samples), batch, 1, 0, 1), steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed()
    torch.manual_seed(0)
    B, T, n = args.batch, args.seq, args.steps
    res: dict[str, list[float]] = {k: [] for k in ("plain_dense", "plain_grown", "llmagogy_zero0", "llmagogy_zero2")}
    for _ in range(args.repeats):  # interleaved repeats: drift in machine speed hits all alike
        res["plain_dense"].append(plain_loop(dense_model(T), B, T, n))
        res["plain_grown"].append(plain_loop(grown_model(T), B, T, n))
        res["llmagogy_zero0"].append(llmagogy_loop(grown_model(T), B, T, n, 0))
        res["llmagogy_zero2"].append(llmagogy_loop(grown_model(T), B, T, n, 2))
    med = {k: float(np.median(v)) for k, v in res.items()}
    out = {
        "threads": torch.get_num_threads(), "batch": B, "seq": T, "steps": n, "repeats": args.repeats,
        "params": n_params(grown_model(T).layout), "n_tensors_grown": len(list(grown_model(T).parameters())),
        "n_tensors_dense": len(list(dense_model(T).parameters())),
        "tokens_per_s": res, "median_tokens_per_s": med,
        "llmagogy_over_plain_zero0": med["llmagogy_zero0"] / med["plain_grown"],
        "llmagogy_over_plain_zero2": med["llmagogy_zero2"] / med["plain_grown"],
        "grown_layout_slowdown": 1 - med["plain_grown"] / med["plain_dense"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(out, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(med)
    ax.bar(names, [med[k] for k in names], yerr=[[med[k] - min(res[k]) for k in names],
                                                 [max(res[k]) - med[k] for k in names]], color="C0")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"tiny 'middle' stage ({out['params']:,} params), batch {B}×{T}, {out['threads']} threads")
    fig.tight_layout()
    fig.savefig(args.out / "throughput.png", dpi=120)
    print(json.dumps({k: v for k, v in out.items() if k != "tokens_per_s"}, indent=1))


if __name__ == "__main__":
    main()
