"""2-process ZeRO-2 runs of the tiny curriculum through the real CLI and torchrun
(the last stage on 1 process with ZeRO-3: growth crosses process counts and ZeRO stages).

Uninterrupted run vs a run whose middle stage is stopped after a checkpoint and re-run:
the held-out losses must be the same (CPU, fp32, same seed).
"""
import json

import pytest

from llmagogy_ds import rundir as RD
from llmagogy_ds.cli import main

pytestmark = pytest.mark.multiprocess

SMALL = [
    "wandb.mode=disabled",
    "stages.nursery.train.tokens=61440", "stages.primary.train.tokens=61440", "stages.middle.train.tokens=61440",
    "defaults.train.eval_every=5", "defaults.train.checkpoint_every=5", "defaults.train.log_every=5",
    "defaults.train.warmup_steps=5", "defaults.train.eval_tokens=8192",
    # the last stage grows from a 2-process ZeRO-2 checkpoint into 1 process with ZeRO-3
    "stages.middle.train.nproc=1", "stages.middle.train.zero_stage=3",
    "stages.middle.train.global_batch=null",  # micro_batch x grad_accum x nproc, as these tests were sized
]


def run(run_dir, *extra):
    args = ["run", "configs/tiny.yaml", "--run-dir", str(run_dir)]
    for o in SMALL:
        args += ["--set", o]
    return main(args + list(extra))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    assert run(d) == 0
    return d


def test_tiny_curriculum_two_process_zero2(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    stages = summary["stages"]
    assert [s["name"] for s in stages] == ["nursery", "primary", "middle"]
    for i, s in enumerate(stages):
        assert s["status"] == "done" and s["world_size"] == (1 if s["name"] == "middle" else 2)
        assert s["tokens"] >= 61440 and s["flops"] > 0 and s["wall_seconds"] > 0
        assert s["loss_end"] < 5.5
        assert len(s["generations"]) == i + 1
        if i:
            # growth lost nothing, and the stage then learned
            assert abs(s["loss_after_growth"] - s["loss_prev_model"]) <= 1e-5
            assert s["loss_end"] < s["loss_after_growth"]
            assert s["n_params"] > stages[i - 1]["n_params"]
            mults = [g["multiplier"] for g in s["generations"]]
            assert mults == [0.5 ** (i - g) for g in range(i + 1)]
            for g in s["generations"][:-1]:
                assert 0 < g["drift"] < 1
    assert summary["total_flops"] == pytest.approx(sum(s["flops"] for s in stages))
    sdir = uninterrupted / "stages" / "02_middle"
    assert RD.weights_at(sdir) == sdir / RD.MODEL_DIR and (sdir / "metrics.jsonl").exists()
    assert (uninterrupted / "config.yaml").exists() and (uninterrupted / "tokenizer.json").exists()
    # re-running a finished curriculum trains nothing more
    assert run(uninterrupted) == 0


def test_interrupted_stage_resumes_to_the_same_result(uninterrupted, tmp_path):
    d = tmp_path / "interrupted"
    assert run(d, "--stage", "nursery") == 0
    assert run(d, "--stage", "primary", "--stop-after", "7") == 0  # checkpoint at step 7, exit
    primary = d / "stages" / "01_primary"
    assert not (primary / "result.json").exists()
    assert (primary / "checkpoints" / "step00000007" / "complete.json").exists()
    assert run(d) == 0  # resumes primary, then middle
    a = json.loads((uninterrupted / "summary.json").read_text())["stages"]
    b = json.loads((d / "summary.json").read_text())["stages"]
    for sa, sb in zip(a, b):
        assert sb["loss_end"] == pytest.approx(sa["loss_end"], abs=1e-6), sa["name"]
    wa = RD.Weights(uninterrupted / "stages" / "02_middle" / RD.MODEL_DIR).load()
    wb = RD.Weights(d / "stages" / "02_middle" / RD.MODEL_DIR).load()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
