"""Checkpoints that cannot be trusted, and frozen stages at their end (issue 13, items 1, 7, 8).

* A torn marker (empty, partial), a truncated model-states file, a planted pickle and a
  checkpoint DeepSpeed fails to load are each set aside (renamed ``<tag>.bad-<reason>``, never
  deleted) with a message, and the stage resumes from the previous complete checkpoint and
  finishes. ``llmagogy status`` shows the torn ones instead of crashing.
* A planted pickle never runs from our loaders: they unpickle with ``weights_only=True``, and
  every file is screened that way before DeepSpeed's own (unrestricted) loaders see it.
* A stage whose earlier generations are all frozen (F = 0) ends with a complete ``model.pt``
  under ZeRO 0-3 and with tp=2 and pp=2; frozen parameters equal their init weights.
"""
import json
import pathlib
import shutil

import pytest
import torch

from llmagogy_ds import rundir as RD
from llmagogy_ds.cli import main
from llmagogy_ds.cluster.launcher import run_stage
from llmagogy_ds.config import load_config
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.train import checkpoint as C
from llmagogy_ds.train import checkpoint_files as F

STATES = "mp_rank_00_model_states.pt"


class Plant:
    """A pickle that creates a file when unpickled without restriction."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def plant_pickle(tag_dir, witness):
    """Replace the model states with a planted pickle and fix the marker's sizes, as an attacker
    who rewrites the run directory would: only the unpickling can tell."""
    torch.save({"module": {}, "llmagogy": Plant(witness)}, tag_dir / STATES)
    info = json.loads((tag_dir / F.MARKER).read_text())
    F.write_marker(tag_dir, {k: v for k, v in info.items() if k != "files"})


def marker(step, **extra):
    return json.dumps({"step": step, "world_size": 1, "zero_stage": 2, **extra})


# --------------------------------------------------------------------------- without a process group
def test_marker_validation_and_status_problems(tmp_path):
    ck = tmp_path / "checkpoints"
    for step, text in ((2, marker(2)), (4, ""), (6, marker(6)[:20]), (8, marker(7)), (10, "[1]")):
        (ck / F.tag_for(step)).mkdir(parents=True)
        (ck / F.tag_for(step) / F.MARKER).write_text(text)
    assert C.complete_tags(ck) == ["step00000002"] and C.latest_complete(ck) == "step00000002"
    probs = C.problems(ck)
    assert set(probs) == {"step00000004", "step00000006", "step00000008", "step00000010"}
    assert "empty" in probs["step00000004"] and "JSON" in probs["step00000006"]
    assert "step 7" in probs["step00000008"] and "object" in probs["step00000010"]
    with pytest.raises(C.CheckpointError, match="empty"):
        C.checkpoint_info(ck, "step00000004")
    # a marker with its step only is enough for `llmagogy status`, not for a resume
    (ck / "step00000012").mkdir()
    (ck / "step00000012" / F.MARKER).write_text('{"step": 12}')
    assert C.latest_complete(ck) == "step00000012"
    with pytest.raises(F.BadCheckpoint, match="lacks world_size, zero_stage"):
        F.check(ck / "step00000012")


def test_check_sizes_screen_and_set_aside(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    good, bad, old = ck / "step00000002", ck / "step00000004", ck / "step00000006"
    for d in (good, bad, old):
        d.mkdir(parents=True)
        torch.save({"module": {"w": torch.ones(3)}}, d / STATES)
    F.write_marker(good, json.loads(marker(2)))
    F.write_marker(bad, json.loads(marker(4)))
    assert json.loads((good / F.MARKER).read_text())["files"] == {STATES: (good / STATES).stat().st_size}
    data = (bad / STATES).read_bytes()
    (bad / STATES).write_bytes(data[: len(data) // 2])
    # a marker written before sizes were recorded: the weights-only screen still sees the truncation
    (old / F.MARKER).write_text(marker(6))
    (old / STATES).write_bytes(data[: len(data) // 2])
    (ck / "step00000006_universal").mkdir()
    assert F.choose(ck) == "step00000002"
    out = capsys.readouterr().out
    assert (ck / "step00000004.bad-files").is_dir() and (ck / "step00000006.bad-unreadable").is_dir()
    assert (ck / "step00000006_universal.bad-unreadable").is_dir()  # derived from it: aside too
    assert "step00000004 is not usable" in out and "the marker says" in out and "resuming from" in out
    # nothing left: start from init; nothing deleted
    F.set_aside(ck, "step00000002", F.BadCheckpoint("test", "a test"))
    assert F.choose(ck) is None
    assert sorted(p.name for p in ck.iterdir()) == ["step00000002.bad-test", "step00000004.bad-files",
                                                    "step00000006.bad-unreadable",
                                                    "step00000006_universal.bad-unreadable"]


def test_planted_pickle_does_not_run_from_our_loaders(tmp_path):
    ck = tmp_path / "checkpoints"
    tag_dir = ck / "step00000004"
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, tag_dir / STATES)
    F.write_marker(tag_dir, json.loads(marker(4, zero_stage=0)))
    witness = tmp_path / "pwned"
    plant_pickle(tag_dir, witness)
    with pytest.raises(C.BadCheckpoint, match="pathlib|getattr|refuses") as e:
        C.load_consolidated(ck, "step00000004")
    assert e.value.reason == "untrusted"
    for f in (C.safe_load, F.screen):
        with pytest.raises(Exception):
            f(tag_dir / STATES)
    assert not witness.exists()
    assert F.choose(ck) is None and (ck / "step00000004.bad-untrusted" / STATES).exists()
    assert not witness.exists()
    # the plant is live: an unrestricted load (what DeepSpeed's loaders do) would have run it
    torch.load(ck / "step00000004.bad-untrusted" / STATES, weights_only=False)
    assert witness.exists()


# --------------------------------------------------------------------------- a stage resumed past bad checkpoints
SMALL = ["wandb.mode=disabled", "stages.nursery.train.tokens=28672", "defaults.train.checkpoint_every=2",
         "defaults.train.keep_checkpoints=6", "defaults.train.eval_every=100", "defaults.train.log_every=100",
         "defaults.train.warmup_steps=2", "defaults.train.eval_tokens=4096", "defaults.train.nproc=1"]


def resume_events(sdir):
    lines = [json.loads(x) for x in (sdir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == "resume"]


@pytest.mark.multiprocess
def test_bad_checkpoints_are_set_aside_and_the_stage_finishes(tmp_path, capfd):
    """Checkpoints at steps 2..12 of a 14-step stage (1 process, ZeRO-2); every one after step 2
    is made bad in its own way. The first re-run fails to load step 12 (noted, exits, no hang);
    the second sets 12, 10, 8, 6, 4 aside, resumes from 2 and finishes."""
    from llmagogy_ds.cluster.slurm import status_rows

    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", SMALL)
    RD.open_run_dir(cfg, run_dir)
    DP.prepare_data(cfg, run_dir)
    assert run_stage(run_dir, "nursery", 1, ["--stop-after", "12"]) == 0
    sdir = run_dir / "stages" / "00_nursery"
    ck = sdir / "checkpoints"
    assert C.complete_tags(ck) == [F.tag_for(s) for s in (2, 4, 6, 8, 10, 12)]
    witness = tmp_path / "pwned"
    # 12: loadable with weights_only, sizes right, but not DeepSpeed's optimizer state: the load fails
    optim = next((ck / "step00000012").glob("*optim_states.pt"))
    torch.save({"not": "an optimizer state"}, optim)
    info = json.loads((ck / "step00000012" / F.MARKER).read_text())
    F.write_marker(ck / "step00000012", {k: v for k, v in info.items() if k != "files"})
    plant_pickle(ck / "step00000010", witness)  # 10: a planted pickle (sizes fixed too)
    (ck / "step00000008" / F.MARKER).write_text("")  # 8: an empty marker
    text = (ck / "step00000006" / F.MARKER).read_text()
    (ck / "step00000006" / F.MARKER).write_text(text[: len(text) // 2])  # 6: a partial marker
    states = (ck / "step00000004" / STATES).read_bytes()
    (ck / "step00000004" / STATES).write_bytes(states[: len(states) // 3])  # 4: truncated states

    row = status_rows(run_dir)[0]  # `llmagogy status` shows the last valid checkpoint, not a crash
    assert row["checkpoint"] == 12 and row["status"] == "stopped"
    assert {"step00000006", "step00000008"} <= set(C.problems(ck))
    capfd.readouterr()

    assert run_stage(run_dir, "nursery", 1) != 0  # step 12 passes the checks but fails to load
    err = capfd.readouterr()
    assert "could not load checkpoint" in err.out + err.err
    assert (ck / "step00000012" / "load-failed-rank0.txt").exists()

    assert run_stage(run_dir, "nursery", 1) == 0
    out = capfd.readouterr().out
    assert not witness.exists()
    for step, reason in ((12, "load"), (10, "untrusted"), (8, "marker"), (6, "marker"), (4, "files")):
        aside = ck / f"{F.tag_for(step)}.bad-{reason}"
        assert aside.is_dir() and any(aside.iterdir()), (step, reason)
        assert f"checkpoint {ck / F.tag_for(step)} is not usable" in out
    assert resume_events(sdir)[-1]["from"] == "step00000002"
    result = json.loads((sdir / "result.json").read_text())
    assert result["steps"] == 14 and RD.weights_at(sdir) == sdir / RD.MODEL_DIR
    assert not witness.exists()


# --------------------------------------------------------------------------- F = 0 at the last transition
FROZEN = ["wandb.mode=disabled", "stages.nursery.train.tokens=16384", "stages.primary.train.tokens=10240",
          "stages.primary.freeze=0", "defaults.train.eval_every=100", "defaults.train.checkpoint_every=100",
          "defaults.train.log_every=100", "defaults.train.warmup_steps=2", "defaults.train.eval_tokens=4096",
          "defaults.train.nproc=1"]


@pytest.fixture(scope="module")
def nursery_done(tmp_path_factory):
    """A 2-stage curriculum's first stage (1 process), shared by every cell of the matrix."""
    d = tmp_path_factory.mktemp("frozen") / "run"
    assert main(["run", "configs/tiny.yaml", "--run-dir", str(d), "--stage", "nursery"]
                + [x for o in FROZEN for x in ("--set", o)]) == 0
    return d


@pytest.mark.multiprocess
@pytest.mark.parametrize("zero,tp,pp", [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1), (1, 2, 1), (1, 1, 2)],
                         ids=["zero0", "zero1", "zero2", "zero3", "tp2", "pp2"])
def test_fully_frozen_stage_ends_with_a_complete_model(nursery_done, tmp_path, zero, tp, pp):
    from llmagogy_ds.data.corpus import load_tokenizer
    from llmagogy_ds.model.layout import param_generations, param_shapes
    from llmagogy_ds.model.stages import Plan

    d = tmp_path / "run"
    shutil.copytree(nursery_done, d)
    nproc = tp * pp
    assert run_stage(d, "primary", nproc, ["--zero-stage", str(zero), "--tp", str(tp), "--pp", str(pp)]) == 0
    sdir = d / "stages" / "01_primary"
    r = json.loads((sdir / "result.json").read_text())
    assert (r["tp"], r["pp"], r["world_size"]) == (tp, pp, nproc)
    assert r["generations"][0]["multiplier"] == 0 and r["generations"][0]["drift"] == 0
    layout = Plan(RD.load_run_config(d), load_tokenizer(d / "tokenizer.json").get_vocab_size()).layout(1)
    init = RD.Weights(sdir / RD.INIT_DIR).load()
    final = RD.Weights(sdir / RD.MODEL_DIR).load()
    shapes = param_shapes(layout)
    assert set(final) == set(shapes) and all(tuple(final[k].shape) == tuple(s) for k, s in shapes.items())
    gen_of = param_generations(layout)
    assert all(torch.equal(final[k], init[k]) for k, g in gen_of.items() if g == 0)  # frozen: bitwise
    assert any(not torch.equal(final[k], init[k]) for k, g in gen_of.items() if g == 1)  # and it trained


def test_save_refuses_what_a_resume_would_refuse(tmp_path, dist_world1, monkeypatch):
    """A class DeepSpeed stores that the screen does not allow fails the first save (not the
    next resume, which would set every checkpoint aside); LLMAGOGY_SAFE_GLOBALS allows it."""
    import deepspeed

    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters()),
                                      config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}})
    ck = tmp_path / "ck"
    assert C.save(engine, ck, 1, {}, keep=3, need_bytes=0) == "step00000001"
    monkeypatch.setattr(F, "safe_globals", F._extra_globals)  # DeepSpeed's classes no longer allowed
    with pytest.raises(C.CheckpointError, match="LLMAGOGY_SAFE_GLOBALS") as e:
        C.save(engine, ck, 2, {}, keep=3, need_bytes=0)
    assert "LossScaler" in str(e.value) or "ZeroStageEnum" in str(e.value)
    assert (ck / "latest").read_text() == "step00000001"
    monkeypatch.setenv("LLMAGOGY_SAFE_GLOBALS", "deepspeed.runtime.fp16.loss_scaler.LossScaler, "
                       "deepspeed.runtime.zero.config.ZeroStageEnum,deepspeed.utils.tensor_fragment.fragment_address")
    assert C.save(engine, ck, 3, {}, keep=3, need_bytes=0) == "step00000003"
    monkeypatch.setenv("LLMAGOGY_SAFE_GLOBALS", "no.such.Class")
    with pytest.raises(C.CheckpointError, match="no.such.Class") as e:  # a mistyped name is not a bad checkpoint
        F.screen(ck / "step00000003" / STATES)
    assert not isinstance(e.value, F.BadCheckpoint)
