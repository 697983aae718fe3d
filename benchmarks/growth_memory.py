"""Per-rank host memory and time to the first optimizer step of a grown ~150M-parameter stage.

A 2-stage curriculum on the built-in synthetic corpus: ``small`` (~25M parameters, 8 layers ×
512) trains for a few steps on 1 process, then grows into ``large`` (~154M, 16 layers × 896),
which starts on 2 processes with tensor parallelism (tp=2, ZeRO-1, fp32). Each rank of
``large`` records its peak resident memory (``VmHWM``, /proc/self/status) when DeepSpeed is
about to be initialized (the rank's weights are built and loaded: the stage's start) and after
the first optimizer step, and the seconds from launch to that step; then the ranks exit.

``--code DIR`` runs another checkout's code (e.g. ``git worktree add /tmp/before HEAD`` for
the figures before a change); the run directory is made fresh each time.

    python benchmarks/growth_memory.py [--code DIR] [--work /tmp/growth-memory] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """
run: {name: growth-memory, seed: 7}
tokenizer: {vocab_size: 512}
defaults:
  model: {head_dim: 64, seq_len: 128}
  train: {lr: 1.0e-3, warmup_steps: 1, micro_batch: 2, precision: fp32, eval_every: 1000,
          checkpoint_every: 1000, eval_tokens: 4096, weight_decay: 0.0, nproc: 1, zero_stage: 1}
stages:
  - name: small
    data: [{path: "synthetic:level0"}]
    model: {layers: 8, hidden: 512, heads: 8, ffn: 1376}
    train: {tokens: 1024}
  - name: large
    data: [{path: "synthetic:level1"}]
    model: {layers: 16, hidden: 896, heads: 14, ffn: 2400}
    growth: {depth: identity, placement: interleave}
    freeze: 0.5
    train: {tokens: 40960, nproc: 2, tp: 2}
"""

# the stage's ranks, with two probes: VmHWM when DeepSpeed is about to be initialized (the
# weights are in place) and after the first optimizer step; then every rank leaves together
PROBE = r"""
import json, os, sys, time
import torch.distributed as dist
from llmagogy_ds.train import loop

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
out, t0 = {}, float(os.environ["GM_T0"])
real_init, real_step = loop.initialize, loop.train_step

def initialize(*a, **k):
    out["vmhwm_stage_start"], out["s_to_engine"] = vm("VmHWM"), time.time() - t0
    return real_init(*a, **k)

def train_step(*a, **k):
    out["vmhwm_before_step"] = vm("VmHWM")
    r = real_step(*a, **k)
    out["vmhwm_after_step"], out["s_to_first_step"] = vm("VmHWM"), time.time() - t0
    rank = dist.get_rank()
    with open(os.path.join(os.environ["GM_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    os._exit(0)

loop.initialize, loop.train_step = initialize, train_step
sys.exit(loop.main(sys.argv[1:]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--work", type=Path, default=Path("/tmp/growth-memory"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    code = args.code.resolve()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cfg, run_dir = args.work / "config.yaml", args.work / "run"
    cfg.write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    py = sys.executable
    subprocess.run([py, "-m", "llmagogy_ds.cli", "run", str(cfg), "--run-dir", str(run_dir), "--stage", "small",
                    "--set", "wandb.mode=disabled"], cwd=code, env=env, check=True)
    # `run` prepares the data of every stage; the launch below starts the grown stage's ranks directly
    probe = args.work / "probe.py"
    probe.write_text(PROBE)
    t0 = time.time()
    subprocess.run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
                    "--run-dir", str(run_dir), "--stage", "large"], cwd=code, check=True,
                   env={**env, "GM_T0": str(t0), "GM_OUT": str(args.work)})
    ranks = [json.loads((args.work / f"rank{r}.json").read_text()) for r in range(2)]
    from llmagogy_ds import rundir as RD  # this checkout's, only for the parameter count
    from llmagogy_ds.data.corpus import load_tokenizer
    from llmagogy_ds.model.layout import n_params

    rc = RD.load_run_config(run_dir)
    n = n_params(RD.run_plan(run_dir, rc, load_tokenizer(RD.tokenizer_path(run_dir)).get_vocab_size()).layout(1))
    growth = RD.read_json(RD.stage_dir(run_dir, rc, 1) / RD.GROWTH) or {}
    res = {"code": str(code), "n_params": n, "full_fp32_bytes": 4 * n, "ranks": ranks,
           "loss_prev_model": growth.get("loss_prev_model"), "loss_after_growth": growth.get("loss_after_growth")}
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
