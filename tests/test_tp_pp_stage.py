"""The tiny curriculum's final stage with tensor parallelism (tp=2) and, separately, pipeline
parallelism (pp=2), every earlier generation frozen (F=0); and resumes that change tp/pp.

nursery runs once on 1 process (ZeRO-2), primary on 2 processes as a 2-stage pipeline
(ZeRO-1, activation checkpointing every 2 layers): the last stage grows from a pipeline-parallel pre-final model into the TP or the PP
layout. Each resume test restarts a copy of a finished stage from its step-10 checkpoint in
another layout: the held-out loss right after resume must be the checkpoint's.
"""
import json
import shutil

import pytest
import torch

from llmagogy_ds.train import checkpoint as C
from llmagogy_ds.cli import main
from llmagogy_ds.cluster.launcher import run_stage
from llmagogy_ds.model.layout import param_generations
from llmagogy_ds.parallel.tensor_parallel import piece_partition_dims

pytestmark = pytest.mark.multiprocess

SMALL = [
    "wandb.mode=disabled",
    "stages.nursery.train.tokens=61440", "stages.primary.train.tokens=61440", "stages.middle.train.tokens=61440",
    "defaults.train.eval_every=10", "defaults.train.checkpoint_every=10", "defaults.train.keep_checkpoints=3",
    "defaults.train.log_every=10", "defaults.train.warmup_steps=5", "defaults.train.eval_tokens=8192",
    "defaults.train.nproc=1",
    "stages.primary.train.nproc=2", "stages.primary.train.pp=2", "stages.primary.train.zero_stage=1",
    "stages.primary.train.activation_checkpointing.every=2",  # the pipeline recomputes groups of 2 layers
    # the final stage: 2 processes, tensor parallel, earlier generations frozen, ZeRO-1
    "stages.middle.train.nproc=2", "stages.middle.train.tp=2", "stages.middle.freeze=0",
    "stages.middle.train.zero_stage=1",
    "stages.middle.train.global_batch=16",  # 30 steps of 16 sequences in every layout
]
MIDDLE = "stages/02_middle"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """nursery (1 process) + primary (pp=2) done; middle not started."""
    d = tmp_path_factory.mktemp("tpbase") / "run"
    for stage in ("nursery", "primary"):
        a = ["run", "configs/tiny.yaml", "--run-dir", str(d), "--stage", stage]
        assert main(a + [x for o in SMALL for x in ("--set", o)]) == 0
    return d


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def final_stage(request, base, tmp_path_factory):
    tp, pp = request.param
    d = copy_run(base, tmp_path_factory.mktemp(f"tp{tp}pp{pp}") / "run")
    assert run_stage(d, "middle", 2, ["--tp", str(tp), "--pp", str(pp)]) == 0
    return d, tp, pp


def optimizer_numel(tag_dir):
    """Elements of fp32 master weights the ZeRO optimizer keeps, over every rank's file."""
    n = 0
    for f in tag_dir.glob("*optim_states.pt"):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        n += sum(t.numel() for t in osd["single_partition_of_fp32_groups"])
    return n


def test_final_stage_frozen_generations_unchanged(final_stage):
    d, tp, pp = final_stage
    r = json.loads((d / MIDDLE / "result.json").read_text())
    assert (r["tp"], r["pp"], r["world_size"]) == (tp, pp, 2)
    prev = json.loads((d / "stages/01_primary/result.json").read_text())
    assert (prev["tp"], prev["pp"]) == (1, 2)  # grown from a pipeline-parallel pre-final model
    # growth preserved the function, measured in the TP / PP layout itself
    assert abs(r["loss_after_growth"] - r["loss_prev_model"]) <= 1e-5
    assert abs(r["loss_at_start"] - r["loss_prev_model"]) <= 1e-5
    assert r["loss_end"] < r["loss_after_growth"] - 0.5  # and then it learned
    from llmagogy_ds import rundir as RD

    init = RD.Weights(d / MIDDLE / RD.INIT_DIR).load()  # safetensors shards
    final = RD.Weights(d / MIDDLE / RD.MODEL_DIR).load()
    from llmagogy_ds.model.stages import Plan
    from llmagogy_ds.data.corpus import load_tokenizer

    cfg = RD.load_run_config(d)
    gen_of = param_generations(Plan(cfg, load_tokenizer(d / "tokenizer.json").get_vocab_size()).layout(2))
    assert set(final) == set(init) == set(gen_of)
    old = [k for k, g in gen_of.items() if g < 2]
    assert old and all(torch.equal(final[k], init[k]) for k in old)  # bitwise
    assert all(not torch.equal(final[k], init[k]) for k, g in gen_of.items() if g == 2)
    # the optimizer holds state for the trainable generation only
    trainable = sum(init[k].numel() for k, g in gen_of.items() if g == 2)
    total = sum(v.numel() for v in init.values())
    assert r["n_trainable"] == trainable < 0.7 * total
    n_opt = optimizer_numel(d / MIDDLE / "checkpoints" / C.latest_complete(d / MIDDLE / "checkpoints"))
    # every TP rank keeps its own copy of the replicated (norm-gain) pieces
    dims = piece_partition_dims(Plan(cfg, load_tokenizer(d / "tokenizer.json").get_vocab_size()).layout(2))
    replicated = sum(init[k].numel() for k, g in gen_of.items() if g == 2 and dims[k] is None)
    assert 0 <= n_opt - (trainable + (tp - 1) * replicated) < 64  # ZeRO alignment padding at most


def test_tp_or_pp_stage_exports_to_transformers(final_stage, tmp_path):
    """middle (trained with tp=2 or pp=2) and primary (pp=2) export from their model.pt as Hugging
    Face LLaMAs: transformers gives our logits and the tokenizer encodes like ours (issue 12)."""
    from transformers import AutoTokenizer

    from llmagogy_ds.evaluation.results import load_model
    from llmagogy_ds.interop.export import export_stage, logits_difference

    d, tp, pp = final_stage
    for s, name in ((2, "middle"), (1, "primary")):
        out = export_stage(d, s, tmp_path / name)
        model, tok, _, _ = load_model(d / "stages" / f"{s:02d}_{name}", device="cpu")
        ids = torch.randint(0, tok.get_vocab_size(), (2, 64), generator=torch.Generator().manual_seed(s))
        assert logits_difference(out, model, ids) <= 1e-4, (name, tp, pp)
        text = "12 + 34 = 46. seven is more than three"
        hf_tok = AutoTokenizer.from_pretrained(str(out))
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text).ids


def resume_in(src, dst, stage, nproc, args):
    """Copy ``src``, keep ``stage``'s step-10 checkpoint only (later stages removed), resume it
    for 1 step with ``args``; returns the resume event and the step-10 held-out loss."""
    d = copy_run(src, dst)
    sdir = next((d / "stages").glob(f"*_{stage}"))
    for later in (d / "stages").iterdir():
        if later.name > sdir.name:
            shutil.rmtree(later)
    (sdir / "result.json").unlink(missing_ok=True)
    for f in ("model", "moments"):  # the final weights' shards
        shutil.rmtree(sdir / f, ignore_errors=True)
    for tag in C.complete_tags(sdir / "checkpoints"):
        if tag != "step00000010":
            shutil.rmtree(sdir / "checkpoints" / tag)
    logged = [json.loads(x) for x in (sdir / "metrics.jsonl").read_text().splitlines()]
    expected = next(x["heldout_loss"] for x in logged if x.get("step") == 10 and "heldout_loss" in x
                    and "event" not in x)
    assert run_stage(d, stage, nproc, args + ["--stop-after", "1"]) == 0
    ev = [json.loads(x) for x in (sdir / "metrics.jsonl").read_text().splitlines()]
    ev = [x for x in ev if x.get("event") == "resume"][-1]
    assert ev["from"] == "step00000010" and ev["relayout"] is True
    return ev, expected


def test_tp_or_pp_checkpoint_resumes_on_tp1_pp1(final_stage, tmp_path):
    d, tp, pp = final_stage
    ev, expected = resume_in(d, tmp_path / "r", "middle", 1, ["--tp", "1", "--pp", "1"])
    assert (ev["tp"], ev["pp"], ev["world_size"]) == (1, 1, 1)
    assert ev["heldout_loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["to_tp2", "to_pp2"])
def test_tp1_checkpoint_resumes_on_tp2_or_pp2(base, tmp_path, tp, pp):
    """nursery's checkpoint (1 process, ZeRO-2) resumed as tp=2 and as pp=2."""
    zero = ["--zero-stage", "1"] if pp > 1 else []  # written under ZeRO-2; DeepSpeed's pipeline takes ≤ 1
    ev, expected = resume_in(base, tmp_path / "r", "nursery", 2, ["--tp", str(tp), "--pp", str(pp)] + zero)
    assert (ev["tp"], ev["pp"], ev["world_size"]) == (tp, pp, 2)
    assert ev["heldout_loss"] == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def tp1_stage(base, tmp_path_factory):
    """The final stage as tp=1, pp=1 on 2 processes (dp=2)."""
    d = copy_run(base, tmp_path_factory.mktemp("tp1pp1") / "run")
    assert run_stage(d, "middle", 2, ["--tp", "1", "--pp", "1"]) == 0
    return d


def test_same_global_batch_steps_and_loss_as_tp1(final_stage, tp1_stage):
    """The global batch belongs to the stage (train.global_batch): tp=1 (dp=2), tp=2 and pp=2 on
    2 processes run the same steps and end within 1e-3 of the same held-out loss (issue 11, 7)."""
    d, tp, pp = final_stage
    r = json.loads((d / MIDDLE / "result.json").read_text())
    ref = json.loads((tp1_stage / MIDDLE / "result.json").read_text())
    assert (ref["tp"], ref["pp"], ref["world_size"]) == (1, 1, 2)
    print(f"layout tp={tp} pp={pp}: steps {r['steps']} loss_end {r['loss_end']:.6f}; "
          f"tp=1 pp=1: steps {ref['steps']} loss_end {ref['loss_end']:.6f}")
    assert r["steps"] == ref["steps"] == 30  # 61440 tokens / (16 x 128)
    assert abs(r["loss_end"] - ref["loss_end"]) <= 1e-3
