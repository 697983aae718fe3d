"""Growth where the model lives (issue 11 items 1–3).

* Each rank grows its own part of the grown model from the previous stage's memory-mapped
  weights: a 2-process tp=2 stage grown from a ~8M-parameter model into a ~57M one keeps each
  rank's peak host memory at the stage's start (weights in place) well below the full fp32
  model above the process's own; the grown weights (``init/``) are exactly ``grow_state_dict``'s;
  ``loss_after_growth`` equals ``loss_prev_model`` (≤ 1e-5), each measured by both ranks in its
  own layout; the final weights and moments leave as safetensors shards.
* Rank 0's preparation of a grown stage builds no model (a guard: the full-model CPU
  evaluation that used to run there must not come back).
* The one loader reads both the shards and an older run's ``model.pt``.
"""
import json
from pathlib import Path

import pytest
import torch

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import load_config
from llmagogy_ds.data.corpus import load_tokenizer
from llmagogy_ds.model.gpt import fresh_init
from llmagogy_ds.model.growth import grow_state_dict
from llmagogy_ds.model.layout import n_params, param_shapes

CONFIG = """
run: {name: sharded, seed: 3}
tokenizer: {vocab_size: 512}
defaults:
  model: {head_dim: 64, seq_len: 64}
  train: {lr: 1.0e-3, warmup_steps: 1, micro_batch: 2, precision: fp32, eval_every: 1000, checkpoint_every: 1000,
          eval_tokens: 1024, weight_decay: 0.0, nproc: 1, zero_stage: 1}
stages:
  - name: small
    data: [{path: "corpus.txt"}]
    model: {layers: 4, hidden: 384, heads: 6, ffn: 1024}
    train: {tokens: 256}
  - name: large
    data: [{path: "corpus.txt"}]
    model: {layers: 8, hidden: 768, heads: 12, ffn: 2048}
    growth: {depth: identity, placement: interleave, optimizer: carry}
    freeze: 0.5
    train: {tokens: 256, nproc: 2, tp: 2}
"""


# per rank besides its shard: a shard file being written (twice: tensors and their bytes) and the
# transients of growing one weight and of evaluating (docs/benchmarks.md, growth memory)
OVERHEAD = 2 * RD.SHARD_BYTES + (64 << 20)


def make_run(tmp_path: Path) -> Path:
    """A run dir whose first stage is 'done': fresh weights and Adam moments as its final shards."""
    words = [f"w{i}" for i in range(300)]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[j] for j in torch.randint(0, 300, (40,), generator=g).tolist()) for _ in range(400)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines) + "\n")  # a paragraph a document
    (tmp_path / "c.yaml").write_text(CONFIG)
    cfg = load_config(tmp_path / "c.yaml")
    run = RD.open_run_dir(cfg, tmp_path / "run")
    from llmagogy_ds.data.prepare import ensure_tokenizer

    tok, _ = ensure_tokenizer(cfg, run)
    plan = RD.run_plan(run, cfg, tok.get_vocab_size())
    sdir = RD.stage_dir(run, cfg, 0)
    w = fresh_init(plan.layout(0), 0.05, torch.Generator().manual_seed(1))
    RD.write_store(sdir / RD.MODEL_DIR, w)
    RD.write_store(sdir / RD.MOMENTS_DIR, {f"{k}.{m}": torch.rand_like(v) * 1e-3 for k, v in w.items()
                                           for m in ("exp_avg", "exp_avg_sq")}, {"steps": {"0": 5}})
    return run


def test_rank0_prepares_a_grown_stage_without_building_a_model(tmp_path, monkeypatch):
    """The guard: rank 0 grows and evaluates nothing before the ranks start (no whole model on
    one process, no long work while the others wait in a barrier)."""
    run = make_run(tmp_path)
    cfg = RD.load_run_config(run)
    from llmagogy_ds.model import gpt, growth
    from llmagogy_ds.model.stages import Plan
    from llmagogy_ds.train import prepare

    def forbidden(*a, **k):
        raise AssertionError("rank 0 built or grew a whole model in prepare_stage")

    monkeypatch.setattr(Plan, "model", forbidden)
    monkeypatch.setattr(gpt.GPT, "__init__", forbidden)
    monkeypatch.setattr(growth, "grow_state_dict", forbidden)
    prepare.prepare_stage(cfg, run, 1)
    sdir = RD.stage_dir(run, cfg, 1)
    rec = json.loads((sdir / RD.GROWTH).read_text())
    assert rec["depth"] == "identity" and "loss_prev_model" not in rec
    assert RD.weights_at(sdir, RD.INIT_DIR) is None  # the ranks grow it


def test_one_loader_for_shards_and_old_files(tmp_path):
    sd = {"a.s0": torch.arange(12.0).reshape(4, 3), "b.s0": torch.ones(5)}
    torch.save(sd, tmp_path / "model.pt")
    store = RD.write_store(tmp_path / "model", sd)
    assert RD.weights_at(tmp_path) == store  # the shards first
    for w in (RD.Weights(store), RD.Weights(tmp_path / "model.pt")):
        assert set(w.keys()) == set(sd) and w.shape("a.s0") == (4, 3)
        assert torch.equal(w.slice("a.s0", 0, 2, 1), sd["a.s0"][2:]) and torch.equal(w.slice("a.s0", 1, 3, 2),
                                                                                     sd["a.s0"][:, 2:])
        assert all(torch.equal(v, sd[k]) for k, v in w.load().items())
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(RD.RunDirError, match="bad.pt: not a model weights file"):
        RD.Weights(tmp_path / "bad.pt")
    (store / RD.WEIGHTS_INDEX).unlink()  # a torn folder is never read: the old file is found instead
    assert RD.weights_at(tmp_path) == tmp_path / "model.pt"


@pytest.mark.multiprocess
def test_tp2_stage_grows_per_rank_from_memory_mapped_weights(tmp_path):
    from llmagogy_ds.cluster.launcher import run_stage

    run = make_run(tmp_path)
    assert run_stage(run, "large", 2) == 0
    cfg = RD.load_run_config(run)
    sdir = RD.stage_dir(run, cfg, 1)
    plan = RD.run_plan(run, cfg, load_tokenizer(RD.tokenizer_path(run)).get_vocab_size())
    full = 4 * n_params(plan.layout(1))
    assert full > 150e6  # the model dominates what is measured
    # both ranks measured the check, each model in its own layout
    g = json.loads((sdir / RD.GROWTH).read_text())
    assert abs(g["loss_after_growth"] - g["loss_prev_model"]) <= 1e-5
    r = json.loads((sdir / RD.RESULT).read_text())
    assert r["loss_after_growth"] == g["loss_after_growth"] and abs(r["loss_at_start"] - g["loss_prev_model"]) <= 1e-5
    # per-rank peak host memory at the stage's start: its half of the model, not the model
    mem = next(json.loads(x) for x in (sdir / RD.METRICS).read_text().splitlines()
               if '"host_memory"' in x)
    # above the process itself: the rank's half (0.5 × full) + a fixed overhead, never the whole model
    # (which the ranks loaded each, and rank 0 grew and evaluated, before)
    grown = [s - b for b, s in zip(mem["host_base_bytes"], mem["host_start_bytes"])]
    assert len(grown) == 2 and all(0 < x <= 0.6 * full + OVERHEAD for x in grown), (grown, full)
    # the grown weights every rank built its part of are exactly the whole grown state dict
    prev = RD.Weights(RD.weights_at(RD.stage_dir(run, cfg, 0))).load()
    want = grow_state_dict(prev, plan.layout(0), plan.layout(1), plan.layouts[1][1], depth="identity",
                           init="mirror", init_std=cfg.stages[1].model.init_std, seed=cfg.run.seed * 1000 + 1)
    init = RD.Weights(sdir / RD.INIT_DIR)
    assert set(init.keys()) == set(want) and all(torch.equal(init[k], v) for k, v in want.items())
    # the final weights and moments as safetensors shards, complete, at the layout's shapes
    final = RD.Weights(sdir / RD.MODEL_DIR)
    assert {k: final.shape(k) for k in final.keys()} == {k: tuple(s) for k, s in param_shapes(plan.layout(1)).items()}
    moments = RD.Weights(sdir / RD.MOMENTS_DIR)
    assert f"{next(iter(want))}.exp_avg" in moments and moments.metadata["steps"]
