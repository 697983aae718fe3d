"""Activation checkpointing: peak memory of a training step with and without it, next to
``llmagogy plan``'s estimate (``cluster/memory.estimate_memory``).

For each mode (``none``, ``full``, ``every:k``) a fresh process builds a stage's model with
``parallel/recompute.py``'s block runner (what ``parallel.model_parallel.build_model`` hands the
model at pp = 1), runs a few fp32 AdamW steps (F multipliers as param
groups, ZeRO-0, no DeepSpeed: the setting of ``tests/test_plan.py``'s check) on one CPU
thread, and reports the peak RSS (``VmHWM``, reset after a warm-up) above the baseline, next
to ``estimate_memory(...).training`` (model states + the forward/backward peak; no fixed
overhead, no ZeRO buckets) and the step time. glibc's mmap threshold is fixed at 128 KiB so
the RSS follows the live bytes (see ``cluster/memory.py``).

    python benchmarks/activation_checkpointing.py [--config configs/tiny.yaml] [--stage 2]
        [--micro-batch 32] [--seq-len 256] [--modes none full every:2 every:3] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from llmagogy_ds.cluster.memory import estimate_memory
from llmagogy_ds.config import load_config
from llmagogy_ds.model.gpt import GPT
from llmagogy_ds.model.generations import param_groups
from llmagogy_ds.model.layout import Shape, initial_layout, param_generations
from llmagogy_ds.model.stages import Plan
from llmagogy_ds.parallel.recompute import block_runner

args = json.loads(sys.argv[1])
cfg = load_config(args["config"], check_files=False)
s, V, k = args["stage"], args["vocab"], args["recompute"]
plan = Plan(cfg, V)
layout, mults = plan.layout(s), plan.multipliers(s)
m = cfg.stages[s].model
seq, mb = args["seq_len"] or m.seq_len, args["micro_batch"] or cfg.stages[s].train.micro_batch

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

g = torch.Generator().manual_seed(0)
idx, tgt = torch.randint(0, V, (mb, seq), generator=g), torch.randint(0, V, (mb, seq), generator=g)
# warm-up of a throwaway tiny model (with the same block runner): lazily loaded kernels and
# thread pools are the process's fixed overhead, not this model's memory
wm = GPT(initial_layout(Shape(1, 16, 1, 16), 32, 16), seq, block_runner=block_runner(k))
wopt = torch.optim.AdamW(wm.parameters())
wi = torch.randint(0, 32, (1, seq))
for _ in range(2):
    wm(wi, wi).backward(); wopt.step(); wopt.zero_grad(set_to_none=False)
del wm, wopt, wi
base = rss()
with open("/proc/self/clear_refs", "w") as f:  # VmHWM counts from here (Linux >= 4.0)
    f.write("5")
model = GPT(layout, seq, m.rope_theta, m.norm_eps, block_runner=block_runner(k))
torch.manual_seed(0)  # the same weights in every mode (so the same losses)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
opt = torch.optim.AdamW(param_groups(model, param_generations(layout), mults, 0.1), lr=1e-3)
times = []
for _ in range(args["steps"]):
    t0 = time.perf_counter()
    loss = model(idx, tgt)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # persistent gradient buffers, as DeepSpeed keeps them
    times.append(time.perf_counter() - t0)
with open("/proc/self/status") as f:
    peak = int(f.read().split("VmHWM:")[1].split()[0]) * 1024
est = estimate_memory(layout, mults, seq_len=seq, micro_batch=mb, precision="fp32", zero_stage=0, overhead=0,
                      recompute=k)
print(json.dumps({"measured": peak - base, "estimate": est.training, "dynamic": est.dynamic,
                  "states": est.model_states, "step_s": min(times), "loss": float(loss),
                  "layers": layout.n_layers, "hidden": layout.d_model, "seq_len": seq, "micro_batch": mb}))
"""


def interval(mode: str) -> int:
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    if mode.startswith("every:") and mode[6:].isdigit() and int(mode[6:]) >= 1:
        return int(mode[6:])
    raise SystemExit(f"--modes: {mode!r} is not none, full or every:K")


def measure(config: str, stage: int, mode: str, *, vocab: int = 512, micro_batch: int | None = None,
            seq_len: int | None = None, steps: int = 2) -> dict:
    """One mode in a fresh process (clean environment, 1 thread, fixed mmap threshold)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    args = {"config": str(config), "stage": stage, "vocab": vocab, "recompute": interval(mode),
            "micro_batch": micro_batch, "seq_len": seq_len, "steps": steps}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(args)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{mode}: {out.stderr[-3000:]}")
    return {"mode": mode, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["none", "full", "every:2", "every:3"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = [measure(a.config, a.stage, m, vocab=a.vocab, micro_batch=a.micro_batch, seq_len=a.seq_len,
                    steps=a.steps) for m in a.modes]
    MiB = 2 ** 20
    r0 = rows[0]
    print(f"{r0['layers']} layers x {r0['hidden']}, micro batch {r0['micro_batch']} x seq {r0['seq_len']}, fp32, "
          "1 thread; peak RSS above baseline vs plan's estimate (model states + forward/backward)")
    print(f"{'mode':>9} {'measured MiB':>13} {'estimate MiB':>13} {'est/meas':>9} {'step s':>7}")
    for r in rows:
        print(f"{r['mode']:>9} {r['measured'] / MiB:13.1f} {r['estimate'] / MiB:13.1f} "
              f"{r['estimate'] / r['measured']:9.2f} {r['step_s']:7.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
