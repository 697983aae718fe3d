"""What carrying Adam's moments across growth does to the first 50 steps after it.

Runs the tiny curriculum's first two stages twice, with ``growth.optimizer: carry`` and
``reset``, the same seed and data; plots the training and held-out loss of the first 50
steps of the grown stage.

    python benchmarks/optimizer_carry.py [--steps 50] [--out docs/benchmarks] [--work /tmp/carry]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from llmagogy_ds.cli import main as llmagogy


def run(work: Path, mode: str, steps: int) -> list[dict]:
    d = work / mode
    shutil.rmtree(d, ignore_errors=True)
    tokens = steps * 16 * 2 * 128  # micro_batch × nproc × seq_len of configs/tiny.yaml
    sets = ["wandb.mode=disabled", f"stages.primary.growth.optimizer={mode}", f"stages.primary.train.tokens={tokens}",
            "stages.primary.train.log_every=1", "stages.primary.train.eval_every=5"]
    for stage in ("nursery", "primary"):
        args = ["run", "configs/tiny.yaml", "--run-dir", str(d), "--stage", stage]
        for s in sets:
            args += ["--set", s]
        assert llmagogy(args) == 0, f"{mode}: stage {stage} failed"
    lines = (d / "stages" / "01_primary" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmagogy-carry"))
    args = ap.parse_args()
    curves = {mode: run(args.work, mode, args.steps) for mode in ("carry", "reset")}
    out = {}
    for mode, recs in curves.items():
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        held = [(r["step"], r["heldout_loss"]) for r in recs if "heldout_loss" in r]
        out[mode] = {"train": train, "heldout": held}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer_carry.json").write_text(json.dumps(out, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, c in (("carry", "C0"), ("reset", "C3")):
        ax.plot(*zip(*out[mode]["train"]), color=c, alpha=0.5, label=f"{mode}: training loss")
        ax.plot(*zip(*out[mode]["heldout"]), "o-", color=c, label=f"{mode}: held-out loss")
    ax.set_xlabel("step after growth (stage 'primary')")
    ax.set_ylabel("loss")
    ax.set_title("Adam moments across growth: carry vs reset (tiny curriculum)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "optimizer_carry.png", dpi=120)
    for mode in out:
        print(mode, "held-out:", [(s, round(v, 4)) for s, v in out[mode]["heldout"]])


if __name__ == "__main__":
    main()
