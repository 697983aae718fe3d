"""Elastic restarts and checkpoint safety.

A stage checkpointed on 2 processes resumes on 1 (and the reverse, and under another ZeRO
stage) through DeepSpeed's universal checkpoint: the held-out loss right after resume equals
the loss of the checkpoint's weights. A checkpoint torn by a kill is never chosen.
"""
import json
import shutil

import pytest
import torch

from llmagogy_ds.train import checkpoint as C
from llmagogy_ds import rundir as RD
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.model.stages import Plan
from llmagogy_ds.config import load_config
from llmagogy_ds.data.corpus import file_sha, heldout_windows, load_tokenizer
from llmagogy_ds.evaluation.evaluate import heldout_loss
from llmagogy_ds.cluster.launcher import run_stage

SMALL = ["wandb.mode=disabled", "stages.nursery.train.tokens=81920", "defaults.train.checkpoint_every=4",
         "defaults.train.eval_every=100", "defaults.train.log_every=4", "defaults.train.warmup_steps=2",
         "defaults.train.eval_tokens=8192"]


def start(run_dir, nproc, stop_after, zero=2):
    """Start stage 'nursery' with ``nproc`` ranks under ZeRO-``zero``; stop after a checkpoint."""
    cfg = load_config("configs/tiny.yaml", SMALL + [f"defaults.train.nproc={nproc}", f"defaults.train.zero_stage={zero}"])
    RD.open_run_dir(cfg, run_dir)
    DP.prepare_data(cfg, run_dir)
    assert run_stage(run_dir, "nursery", nproc, ["--stop-after", str(stop_after)]) == 0


def checkpoint_loss(run_dir, tag):
    cfg = load_config(run_dir / "config.yaml")
    tok = load_tokenizer(run_dir / "tokenizer.json")
    plan = Plan(cfg, tok.get_vocab_size())
    model = plan.model(0)
    model.load_state_dict(C.load_consolidated(RD.stage_dir(run_dir, cfg, 0) / "checkpoints", tag))
    data = DP.stage_data(cfg, run_dir, 0, tok, file_sha(run_dir / "tokenizer.json"))
    return heldout_loss(model, heldout_windows(data, cfg.stages[0].model.seq_len, cfg.stages[0].train.eval_tokens), 16)


def resume_event(run_dir):
    lines = [json.loads(x) for x in (run_dir / "stages" / "00_nursery" / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == "resume"][-1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("first,then,zero_then", [(2, 1, 2), (1, 2, 2), (2, 2, 3), (2, 1, 1)])
def test_resume_on_another_world_size_or_zero_stage(tmp_path, first, then, zero_then):
    run_dir = tmp_path / "run"
    start(run_dir, first, stop_after=4)
    ckpt = run_dir / "stages" / "00_nursery" / "checkpoints"
    assert C.latest_complete(ckpt) == "step00000004"
    expected = checkpoint_loss(run_dir, "step00000004")
    extra = ["--stop-after", "1"] + (["--zero-stage", str(zero_then)] if zero_then != 2 else [])
    assert run_stage(run_dir, "nursery", then, extra) == 0
    ev = resume_event(run_dir)
    assert ev["from"] == "step00000004" and ev["world_size"] == then and ev["universal"] is True
    assert ev["heldout_loss"] == pytest.approx(expected, abs=1e-6)
    assert (ckpt / "step00000004_universal" / "complete.json").exists()


def test_torn_checkpoint_is_never_chosen(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        (ckpt / C.tag_for(step)).mkdir(parents=True)
    for step in (4, 8):
        (ckpt / C.tag_for(step) / C.MARKER).write_text(json.dumps({"step": step, "world_size": 1, "zero_stage": 2}))
    # step 12 was being written when the job was killed: no marker
    assert C.latest_complete(ckpt) == "step00000008"
    (ckpt / "latest").write_text("step00000012")  # even a stale pointer does not matter
    assert C.latest_complete(ckpt) == "step00000008"
    shutil.rmtree(ckpt / C.tag_for(8))
    assert C.latest_complete(ckpt) == "step00000004"


def test_free_disk_check_fails_before_writing(tmp_path):
    with pytest.raises(C.CheckpointError, match="free"):
        C.check_free_disk(tmp_path / "ck", 1 << 60)
    assert not any((tmp_path / "ck").iterdir())


def test_zero0_checkpoint_cannot_change_zero_stage(tmp_path):
    d = tmp_path / "step00000004"
    d.mkdir()
    (d / C.MARKER).write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 0}))
    assert not C.needs_universal(tmp_path, "step00000004", 1, 0)
    with pytest.raises(C.CheckpointError, match="ZeRO-0"):
        C.needs_universal(tmp_path, "step00000004", 1, 2)


@pytest.mark.parametrize("zero_from,zero_to", [(2, 3), (3, 1)])
def test_universal_load_keeps_generation_groups(tmp_path, dist_world1, zero_from, zero_to):
    """ZeRO-3's universal loader copies group 0's hyperparameters into every group; after our
    repair each generation keeps its name, weight decay, lr multiplier and Adam step."""
    from llmagogy_ds.config import TrainConfig
    from llmagogy_ds.model.generations import GenerationLR, multipliers, param_groups
    from llmagogy_ds.model.growth import grow_state_dict
    from llmagogy_ds.model.layout import Shape, param_generations, stage_layouts
    from llmagogy_ds.model.gpt import GPT, fresh_init
    from llmagogy_ds.parallel.optim_state import group_meta, group_steps, restore_group_meta
    from llmagogy_ds.parallel.engine import initialize

    layouts = stage_layouts([Shape(2, 32, 4, 48), Shape(3, 48, 6, 64)], [None, ("identity", "top")], 97, 8)
    sd = grow_state_dict(fresh_init(layouts[0][0], 0.02, torch.Generator().manual_seed(0)),
                         layouts[0][0], *layouts[1], seed=1)

    def engine(zero, universal=False):
        model = GPT(layouts[1][0], 16)
        model.load_state_dict(sd)
        C.mark_universal(model)
        groups = param_groups(model, param_generations(layouts[1][0]), multipliers([1.0, 0.5], 1), 0.1)
        train = TrainConfig(lr=1e-3, micro_batch=4, zero_stage=zero, tokens=1)
        return initialize(model, groups, train, lambda o: GenerationLR(o, 1e-3, 100, 0, "constant"),
                          load_universal=universal)

    e, _, sched = engine(zero_from)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        xy = torch.randint(0, 97, (4, 17), generator=g)
        e.backward(e(xy[:, :-1], xy[:, 1:]))
        e.step()
    want_meta, want_steps = group_meta(e), group_steps(e)
    ck = tmp_path / "ck"
    C.save(e, ck, 3, {"adam_steps": want_steps}, keep=2, need_bytes=0)
    x = torch.randint(0, 97, (2, 17), generator=g)
    want_loss = e.module(x[:, :-1], x[:, 1:]).item()

    tag = C.to_universal(ck, "step00000003")
    e2, _, sched2 = engine(zero_to, universal=True)
    meta = group_meta(e2)
    _, client = e2.load_checkpoint(str(ck), tag=tag)
    restore_group_meta(e2, meta, client["adam_steps"])
    sched2.apply()
    assert group_meta(e2) == want_meta
    assert group_steps(e2) == want_steps
    lrs = {g["name"]: g["lr"] for g in e2.optimizer.param_groups}
    assert lrs == {"gen0": 5e-4, "gen0_nodecay": 5e-4, "gen1": 1e-3, "gen1_nodecay": 1e-3}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(e2.module.parameters()), enabled=zero_to == 3):
        assert e2.module(x[:, :-1], x[:, 1:]).item() == pytest.approx(want_loss, abs=1e-6)
