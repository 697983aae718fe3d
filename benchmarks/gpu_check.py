"""The one-call GPU check (issue 11 item 6): what a machine with one GPU and no network can tell
about the trainer in a few minutes, through the trainer's own entry points.

    bash benchmarks/gpu_check.sh            # on the GPU machine: carried wheels, then this
    bash benchmarks/gpu_check.sh --cpu      # the same code paths at tiny shapes on CPU (the test)

Parts, in this order (each in its own process, so one failing or running out of time leaves the
others' figures; the failure is recorded in the JSON):

- ``stage_none`` / ``stage_full``: one stage of the ``university`` shape of
  configs/example-1b.yaml (16 x 2048, seq 2048, vocab 50304, micro batch 8) for a few dozen
  steps without and with ``train.activation_checkpointing: full``: tokens/s, MFU, peak memory,
  next to ``llmagogy plan``'s estimate for the same stage (``train.loop.setup_stage`` builds it
  exactly as a training run does; ``run_steps`` with the metrics hook trains it);
- ``growth``: the example's ``grade6`` shape (9 x 1024) trained a few steps (``train_stage``:
  checkpoint, stage end), then grown into the ``university`` shape: ``loss_prev_model`` and
  ``loss_after_growth`` from the stage's growth record, the held-out loss in the grown stage's
  own layout on the device, and a few training steps of the grown model;
- ``tiny``: ``llmagogy run configs/tiny.yaml`` end to end (3 stages, growth, torchrun) in bf16
  on one process, as a user starts it.

The big stages read synthetic text (``synthetic:level2``, no network) through a byte-level BPE
with exactly the example's vocabulary size (``synthetic_tokenizer``), so that embeddings, head
and logits have the planned size. ``--cpu`` takes the shapes of configs/tiny.yaml instead
(nursery -> middle). Results: ``$OUT/gpu_check.json`` when ``OUT`` is set, else ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, installed or not (the GPU machine: not)
# in this order: the 1B figures first (the first part also pays DeepSpeed's FusedAdam JIT build)
PARTS = ("stage_none", "stage_full", "growth", "tiny")
# Per mode: where the shapes come from (the small and the big stage of that config), the steps, the
# precision, and how long each part may take (s). The CPU mode's growth part trains in fp32, where
# the grown model's loss in its own layout equals the previous model's to 1e-5 (bf16 rounds at ~1e-3;
# the tiny part covers growth in bf16).
MODES = {
    "gpu": {"shapes": "configs/example-1b.yaml", "small": "grade6", "big": "university", "micro_batch": None,
            "steps": 30, "small_steps": 10, "grown_steps": 10, "eval_windows": 4, "log_every": 5,
            "precision": "bf16", "growth_precision": "bf16", "budget": 450,  # + the wheels: <= 8 min
            "timeouts": {"stage_none": 150, "stage_full": 90, "growth": 150, "tiny": 150}},
    "cpu": {"shapes": "configs/tiny.yaml", "small": "nursery", "big": "middle", "micro_batch": 4,
            "steps": 4, "small_steps": 3, "grown_steps": 3, "eval_windows": 2, "log_every": 2,
            "precision": "bf16", "growth_precision": "fp32", "budget": 600,  # a shared 2-core machine
            "timeouts": {"stage_none": 150, "stage_full": 150, "growth": 200, "tiny": 300}},
}


# --------------------------------------------------------------------------- environment
def device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": socket.gethostname(), "cuda_available": torch.cuda.is_available()}
    for mod, name in (("deepspeed", "deepspeed"), ("megatron.core", "megatron_core")):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[name] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - recorded, the parts will fail with the same error
            info[name] = f"not importable: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, device_memory_gib=p.total_memory / 2 ** 30, capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def plan_kind(device: str) -> str:
    """``memory.GPUS`` key for a device name (the plan's memory and peak TFLOPs)."""
    d = device.upper()
    if "H200" in d:
        return "h200"
    if "H100" in d:
        return "h100-pcie" if "PCIE" in d else "h100-sxm"
    if "A100" in d:
        return "a100-80" if "80" in d else "a100-40"
    if "L40" in d:
        return "l40s"
    return "cpu" if d.startswith("CPU") else "h100-sxm"


def single_rank_env() -> None:
    """A world of one rank in this process (what torchrun would export)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        os.environ.setdefault(k, v)


def synthetic_tokenizer(vocab_size: int, path: Path) -> Path:
    """A byte-level BPE with exactly ``vocab_size`` entries: the 256 byte symbols, the end-of-text
    token and merges of byte pairs in a fixed order. Its merges mean nothing; it gives the
    model the planned embedding, head and logit sizes without a corpus to learn them from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from llmagogy_ds.data.corpus import EOS

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    n_merges = vocab_size - len(alphabet) - 1
    for a in alphabet:
        for b in alphabet:
            if len(merges) == n_merges:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


# --------------------------------------------------------------------------- configs
def shapes(mode: str) -> dict:
    """The small and big stage's model blocks and the vocabulary, from the mode's config."""
    from llmagogy_ds.config import load_config

    m = MODES[mode]
    cfg = load_config(REPO / m["shapes"], check_files=False)
    by_name = {s.name: s for s in cfg.stages}
    out = {}
    for role in ("small", "big"):
        st = by_name[m[role]]
        out[role] = {"name": st.name, "layers": st.model.layers, "hidden": st.model.hidden,
                     "heads": st.model.heads, "ffn": st.model.ffn}
        out[f"{role}_micro_batch"] = m["micro_batch"] or st.train.micro_batch
    big = by_name[m["big"]].model
    out.update(head_dim=big.head_dim, seq_len=big.seq_len, rope_theta=big.rope_theta,
               vocab=cfg.tokenizer.vocab_size)
    return out


def check_config(mode: str, tok_path: Path, stages: list[tuple[str, int]], ac: str = "none",
                 peak_tflops: float | None = None, precision: str | None = None) -> dict:
    """A curriculum (as the YAML would hold it) of the given ``(role, steps)`` stages."""
    m, sh = MODES[mode], shapes(mode)
    seq, mb = sh["seq_len"], sh["big_micro_batch"]
    train = {"lr": 3.0e-4, "warmup_steps": 2, "schedule": "cosine", "micro_batch": mb, "nproc": 1,
             "zero_stage": 1, "precision": precision or m["precision"], "eval_every": 10 ** 6,
             "checkpoint_every": 10 ** 6, "eval_tokens": m["eval_windows"] * seq, "log_every": m["log_every"],
             "weight_decay": 0.1, "grad_clip": 1.0}
    if peak_tflops:
        train["peak_tflops"] = peak_tflops
    if ac != "none":
        train["activation_checkpointing"] = ac
    out = []
    for role, steps in stages:
        shape = dict(sh[role])
        out.append({"name": shape.pop("name"), "data": [{"path": "synthetic:level2"}], "model": shape,
                    "train": {"tokens": steps * mb * seq}})
    return {"run": {"name": f"gpu-check-{'-'.join(s['name'] for s in out)}", "seed": 1234},
            "tokenizer": {"path": str(tok_path)}, "wandb": {"mode": "disabled"},
            "defaults": {"model": {"head_dim": sh["head_dim"], "seq_len": seq, "rope_theta": sh["rope_theta"]},
                         "train": train},
            "stages": out}


def prepared_run(raw: dict, work: Path, name: str) -> tuple[object, Path]:
    """Write the config, open the run dir and prepare its data as ``llmagogy prepare`` does."""
    import yaml

    from llmagogy_ds.cli import prepare_run

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    args = argparse.Namespace(config=str(path), run_dir=work / name, overrides=[], stage=None, restart=False)
    return prepare_run(args)


# --------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory of what follows ``reset()``: the CUDA allocator's, or on CPU the process's
    peak RSS (VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")

    def read(self) -> dict:
        import torch

        GiB = 2 ** 30
        if self.cuda:
            torch.cuda.synchronize()
            return {"kind": "cuda allocator", "before_steps_gib": self.base / GiB,
                    "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
        return {"kind": "process RSS (VmHWM)", "before_steps_gib": self.base / GiB,
                "peak_rss_gib": self._status("VmHWM") / GiB}


def throughput(sdir: Path, skip_first: bool = True) -> dict:
    """tokens/s and MFU as the trainer logged them (metrics.jsonl); the first interval holds the
    warm-up (kernel selection, allocations) and is reported apart."""
    from llmagogy_ds.rundir import METRICS
    from llmagogy_ds.train.metrics import read_records

    recs = [r for r in read_records(sdir / METRICS) if "tokens_per_s" in r]
    if not recs:
        raise RuntimeError(f"{sdir / METRICS}: no throughput records")
    steady = recs[1:] if skip_first and len(recs) > 1 else recs
    tps = sorted(r["tokens_per_s"] for r in steady)
    med = tps[len(tps) // 2]
    mfus = sorted(r["mfu"] for r in steady if r.get("mfu") is not None)
    return {"tokens_per_s": med, "mfu": mfus[len(mfus) // 2] if mfus else None,
            "tokens_per_s_first_interval": recs[0]["tokens_per_s"], "intervals": len(steady),
            "losses": [r["loss"] for r in recs]}


def plan_figures(cfg, vocab: int, s: int, kind: str) -> dict:
    from llmagogy_ds.cluster.plan import plan_curriculum

    p = plan_curriculum(cfg, vocab=vocab, gpu=kind)[s]
    m, GiB = p.memory, 2 ** 30
    return {"gpu": p.gpu, "n_params": p.n_params, "flops_per_token": p.flops_per_token, "total_gib": m.total / GiB,
            "without_fixed_overhead_gib": (m.total - m.overhead) / GiB, "weights_gib": m.weights / GiB,
            "gradients_gib": m.gradients / GiB, "optimizer_gib": m.optimizer / GiB,
            "activations_gib": m.activations / GiB, "dynamic_gib": m.dynamic / GiB, "buffers_gib": m.buffers / GiB,
            "overhead_gib": m.overhead / GiB, "allocator_gib": m.allocator / GiB, "fits": p.fits}


def train_measured(run, steps_note: str, cuda: bool) -> dict:
    """``run_steps`` with the metrics hook only (no evaluation, no checkpoint): the steps' figures."""
    import torch

    from llmagogy_ds.train.hooks import MetricsHook
    from llmagogy_ds.train.loop import run_steps
    from llmagogy_ds.train.metrics import MetricsLogger

    run.logger = MetricsLogger(run.sdir, run.rank, run.cfg.wandb, run.cfg.run.name, run.stage.name,
                               run.total_steps, run.state["step"])
    mem = PeakMemory(cuda)
    mem.reset()
    t0 = time.time()
    run_steps(run, [MetricsHook()])
    if cuda:
        torch.cuda.synchronize()
    wall = time.time() - t0
    run.logger.close()
    out = {"steps": run.state["step"], "what": steps_note, "wall_s": wall, "memory": mem.read(),
           "tokens_per_step": run.tokens_per_step, "flops_per_token": run.fpt,
           "optimizer": type(run.engine.optimizer).__name__,
           "inner_optimizer": type(getattr(run.engine.optimizer, "optimizer", run.engine.optimizer)).__name__}
    out.update(throughput(run.sdir))
    return out


# --------------------------------------------------------------------------- the parts
def part_tiny(mode: str, work: Path, ctx: dict) -> dict:
    """configs/tiny.yaml end to end through the CLI (torchrun per stage), one process, bf16."""
    from llmagogy_ds import rundir as RD

    run_dir = work / "tiny"
    sets = ["defaults.train.nproc=1", f"defaults.train.precision={MODES[mode]['precision']}",
            "wandb.mode=disabled"]
    if mode == "cpu":  # a few steps of each stage: micro batch 4, 4 sequences per step, 4 steps
        sets += [f"stages.{s}.train.tokens={4 * 4 * 128}" for s in ("nursery", "primary", "middle")]
        sets += ["defaults.train.micro_batch=4", "stages.middle.train.global_batch=4",
                 "defaults.train.eval_tokens=1024", "defaults.train.eval_every=1000"]
    cmd = [sys.executable, "-m", "llmagogy_ds.cli", "run", str(REPO / "configs/tiny.yaml"), "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    log = work / "tiny-cli.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"llmagogy run exited {rc}: {log.read_text()[-3000:]}")
    cfg = RD.load_run_config(run_dir)
    stages = []
    for s, st in enumerate(RD.read_summary(run_dir)["stages"]):
        rec = {k: st.get(k) for k in ("name", "status", "steps", "tokens", "wall_seconds", "loss_prev_model",
                                     "loss_after_growth", "loss_at_start", "loss_end", "exam_accuracy", "device")}
        rec.update(throughput(RD.stage_dir(run_dir, cfg, s)))
        stages.append(rec)
    return {"command": " ".join(["llmagogy", *cmd[3:]]), "wall_s": wall, "stages": stages}


def part_stage(mode: str, work: Path, ctx: dict, ac: str) -> dict:
    """The big stage from scratch, a few dozen steps, with or without activation checkpointing."""
    import torch

    from llmagogy_ds.config import TrainConfig

    if ac != "none" and "activation_checkpointing" not in {f.name for f in fields(TrainConfig)}:
        return {"available": False,
                "reason": "not available: train.activation_checkpointing is not in this checkout's config schema"}
    from llmagogy_ds.train.loop import setup_stage

    m = MODES[mode]
    raw = check_config(mode, Path(ctx["tokenizer"]), [("big", m["steps"])], ac, ctx["peak_tflops"])
    t0 = time.time()
    cfg, run_dir = prepared_run(raw, work, f"stage-{ac}")
    t_prep = time.time()
    single_rank_env()
    run = setup_stage(run_dir, cfg.stages[0].name)
    t_setup = time.time()
    out = {"activation_checkpointing": ac, "available": True, "shape": raw["stages"][0]["model"],
           "seq_len": raw["defaults"]["model"]["seq_len"], "micro_batch": run.train.micro_batch,
           "precision": run.train.precision, "zero_stage": run.train.zero_stage, "n_params": run.n_total,
           "vocab": run.tok.get_vocab_size(), "prepare_s": t_prep - t0, "setup_s": t_setup - t_prep}
    out.update(train_measured(run, "from scratch", torch.cuda.is_available()))
    out["plan"] = plan_figures(cfg, out["vocab"], 0, ctx["plan_kind"])
    mem, plan = out["memory"], out["plan"]
    # the allocator's bytes leave out the CUDA context and kernels (the plan's fixed overhead);
    # a process's RSS holds them
    out["measured_over_plan"] = (
        {"peak_allocated": mem["peak_allocated_gib"] / plan["without_fixed_overhead_gib"],
         "peak_reserved": mem["peak_reserved_gib"] / plan["without_fixed_overhead_gib"]}
        if "peak_allocated_gib" in mem else {"peak_rss": mem["peak_rss_gib"] / plan["total_gib"]})
    return out


def part_growth(mode: str, work: Path, ctx: dict) -> dict:
    """The small stage trained to its end (``train_stage``: checkpoint, final weights), then the
    big stage as a training run starts it (growth, the function-preservation check, the held-out
    loss in its own layout) and a few steps of it (``--stop-after``: no checkpoint of 1B)."""
    from llmagogy_ds import rundir as RD
    from llmagogy_ds.train.loop import train_stage
    from llmagogy_ds.train.metrics import read_records

    m = MODES[mode]
    raw = check_config(mode, Path(ctx["tokenizer"]), [("small", m["small_steps"]), ("big", m["grown_steps"])],
                       peak_tflops=ctx["peak_tflops"], precision=m["growth_precision"])
    cfg, run_dir = prepared_run(raw, work, "growth")
    single_rank_env()
    small, big = (s.name for s in cfg.stages)
    t0 = time.time()
    res0 = train_stage(run_dir, small)
    t1 = time.time()
    train_stage(run_dir, big, stop_after=m["grown_steps"])
    t2 = time.time()
    sdir = RD.stage_dir(run_dir, cfg, 1)
    growth = RD.read_json(sdir / RD.GROWTH) or {}
    start = [r for r in read_records(sdir / RD.METRICS) if r.get("event") == "start"]
    out = {"small": raw["stages"][0]["model"], "big": raw["stages"][1]["model"], "precision": m["growth_precision"],
           "small_stage": {"steps": res0.get("steps"), "loss_end": res0.get("loss_end"), "wall_s": t1 - t0},
           "grown_stage_wall_s": t2 - t1, "heldout_windows": m["eval_windows"],
           "loss_prev_model": growth.get("loss_prev_model"), "loss_after_growth": growth.get("loss_after_growth"),
           "loss_at_start_in_layout": start[0]["heldout_loss"] if start else None,
           "growth_record": {k: v for k, v in growth.items() if not k.startswith("loss_")}}
    if out["loss_prev_model"] is not None and out["loss_after_growth"] is not None:
        out["abs_diff_growth"] = abs(out["loss_after_growth"] - out["loss_prev_model"])
    if out["loss_prev_model"] is not None and out["loss_at_start_in_layout"] is not None:
        out["abs_diff_in_layout"] = abs(out["loss_at_start_in_layout"] - out["loss_prev_model"])
    out["grown_steps"] = throughput(sdir)
    return out


# --------------------------------------------------------------------------- driver
def child(args) -> int:
    ctx = json.loads(Path(args.ctx).read_text())
    try:
        name, mode, work = args.part, args.mode, Path(args.work)
        if name.startswith("stage_"):
            res = {"ok": True, **part_stage(mode, work, ctx, name.split("_", 1)[1])}
        else:
            res = {"ok": True, **(part_tiny if name == "tiny" else part_growth)(mode, work, ctx)}
    except BaseException as e:  # noqa: BLE001 - recorded in the JSON; the other parts still run
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    Path(args.part_out).write_text(json.dumps(res, indent=1, default=str))
    # leave without tearing down the process group and CUDA state: the figures are written
    os._exit(0 if res["ok"] else 1)


def run_group(cmd: list[str], env: dict, log, limit: float) -> int | str:
    """Run a part in its own process group; past ``limit`` the whole group is killed (the tiny
    part's torchrun and trainer too, which would otherwise hold the GPU for the next part)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (also LLMAGOGY_GPU_CHECK_CPU=1)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default $OUT/gpu_check.json, else "
                                                             "./gpu_check.json)")
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: a fresh temporary dir)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all parts (default: the mode's)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return child(args)
    mode = "cpu" if args.cpu or os.environ.get("LLMAGOGY_GPU_CHECK_CPU") else "gpu"
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})")
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json"))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    info = device_info()
    result = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "work": str(work), **info,
              "parts": {}}
    if mode == "gpu" and not info["cuda_available"]:
        result["error"] = "no CUDA device: run with --cpu for the CPU mode"
        out.write_text(json.dumps(result, indent=1))
        print(result["error"], file=sys.stderr)
        return 2
    kind = plan_kind(info["device"])
    from llmagogy_ds.cluster.memory import get_gpu

    sh = shapes(mode)
    ctx = {"tokenizer": str(synthetic_tokenizer(sh["vocab"], work / f"tokenizer-{sh['vocab']}.json")),
           "plan_kind": kind, "peak_tflops": get_gpu(kind).peak_tflops(MODES[mode]["precision"])}
    result.update(plan_kind=kind, peak_tflops=ctx["peak_tflops"], shapes=sh)
    (work / "ctx.json").write_text(json.dumps(ctx))
    budget = args.budget or MODES[mode]["budget"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::FutureWarning")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for name in parts:
        left = budget - (time.time() - t_start)
        limit = min(MODES[mode]["timeouts"][name], left)
        if limit < 20:
            left = max(0.0, left)
            result["parts"][name] = {"ok": False, "error": f"not run: {left:.0f} s of the {budget:.0f} s budget left"}
            continue
        part_out = work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--mode", mode, "--work", str(work),
               "--ctx", str(work / "ctx.json"), "--part-out", str(part_out)]
        t0 = time.time()
        with open(work / f"{name}.log", "w") as log:
            rc = run_group(cmd, env, log, limit)
        res = json.loads(part_out.read_text()) if part_out.exists() else {"ok": False}
        if not part_out.exists():
            logs = (work / f"{name}.log", work / f"{name}-cli.log")
            tail = "".join(f.read_text(errors="replace")[-3000:] for f in logs if f.exists())
            res["error"] = (f"timed out after {limit:.0f} s" if rc == "timeout" else f"exited {rc}") + \
                f" without a result; log tail:\n{tail}"
        res["part_wall_s"] = time.time() - t0
        result["parts"][name] = res
        for log in (work / f"{name}.log", work / f"{name}-cli.log"):  # beside the JSON: they come back with it
            if log.exists():
                (out.parent / f"gpu_check.{log.name}").write_bytes(log.read_bytes()[-(1 << 20):])
        print(f"[gpu_check] {name}: {'ok' if res['ok'] else 'FAILED: ' + res['error'][:300]} "
              f"({res['part_wall_s']:.0f} s)", flush=True)
        result["wall_s"] = time.time() - t_start
        out.write_text(json.dumps(result, indent=1, default=str))  # after every part: a kill keeps the rest
    result["wall_s"] = time.time() - t_start
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"[gpu_check] {out} ({result['wall_s']:.0f} s)")
    return 0 if all(p["ok"] for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
