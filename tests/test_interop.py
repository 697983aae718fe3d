"""Issue 12: a grown model is a standard LLaMA (one RMSNorm epsilon, exact growth), its export to
Hugging Face (transformers loads it offline, same logits, same tokens), a HF LLaMA imported as
stage 0 (same logits, then grows exactly and trains), and lm-evaluation-harness on our items
(same log-likelihoods and acc as our scorer). Everything is made in the test: no download."""
import argparse
import json
import math

import pytest
import torch
import yaml

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import ConfigError, ModelConfig, load_config
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.evaluation import results as ER
from llmagogy_ds.evaluation.exams import score_multiple_choice
from llmagogy_ds.interop import commands as CMD
from llmagogy_ds.interop import export as X
from llmagogy_ds.interop import import_hf as IH
from llmagogy_ds.interop import lm_eval as LE
from llmagogy_ds.interop.hf import from_hf, to_hf
from llmagogy_ds.model.gpt import GPT, RMSNorm, fresh_init
from llmagogy_ds.model.growth import grow_state_dict
from llmagogy_ds.model.layout import Shape, model_norm_eps, stage_layouts, total
from llmagogy_ds.model.stages import ONE_EPS, keeps_per_norm_eps
from llmagogy_ds.train.prepare import prepare_stage

torch.set_num_threads(1)
HD, SEQ = 8, 32
TEXTS = [f"{a} plus {b} is {a + b}. the cat sat on the mat with {a} dogs." for a in range(12) for b in range(12)]
# eps large enough that a wrong epsilon shows in the logits (1e-5 hides it in a trained model)
EPS = 1e-2


@pytest.fixture(scope="module")
def tok():
    return D.train_tokenizer(TEXTS, 300, 1)


def batch(vocab, seed=0, n=4):
    x = torch.randint(0, vocab, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def model_of(layout, sd, eps=EPS):
    m = GPT(layout, SEQ, norm_eps=eps)
    m.load_state_dict(sd)
    return m


def trained(layout, sd, steps=5, eps=EPS, seed=0):
    """``sd`` after a few Adam steps: new generations leave their exact-zero start."""
    m = model_of(layout, sd, eps)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for k in range(steps):
        x, y = batch(layout.vocab, seed + k)
        opt.zero_grad()
        m(x, y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------- one epsilon, exact growth
CASES = {
    "depth": [Shape(2, 32, 4, 48), Shape(4, 32, 4, 48), Shape(6, 32, 4, 48)],
    "hidden+heads": [Shape(2, 32, 4, 48), Shape(2, 48, 6, 48), Shape(2, 64, 8, 48)],
    "odd-units": [Shape(2, 24, 3, 40), Shape(2, 32, 4, 43), Shape(3, 40, 5, 47)],
    "depth+width": [Shape(2, 32, 4, 48), Shape(3, 48, 6, 96), Shape(5, 64, 8, 128)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_grown_model_has_one_epsilon_and_growth_stays_exact(case):
    layouts = stage_layouts(CASES[case], [None] + [("identity", "interleave")] * 2, 97, HD)
    sd = trained(layouts[0][0], fresh_init(layouts[0][0], 0.02, torch.Generator().manual_seed(0)))
    x, y = batch(97, 99)
    for t in (1, 2):
        prev, (layout, origins) = layouts[t - 1][0], layouts[t]
        before = model_of(prev, sd)(x, y).item()
        grown = grow_state_dict(sd, prev, layout, origins, seed=t)
        model = model_of(layout, grown)
        assert abs(model(x, y).item() - before) <= 1e-5, (case, t)
        # every norm, old or born in a new block, has the model's one epsilon: eps × H_0 / H
        eps = {m.eps for m in model.modules() if isinstance(m, RMSNorm)}
        assert eps == {model_norm_eps(layout, EPS)}
        assert model_norm_eps(layout, EPS) == pytest.approx(EPS * CASES[case][0].hidden / total(layout.hidden))
        sd = trained(layout, grown, seed=10 * t)  # new dims and new norms leave their exact start


def test_runs_grown_before_keep_their_per_norm_epsilon():
    """A layout with per_norm_eps is the model of an old run: each norm's epsilon in units of the
    width it was born with, as before one-epsilon norms; its growth stays exact too."""
    shapes = CASES["depth+width"]
    growth = [None] + [("identity", "interleave")] * 2
    old = stage_layouts(shapes, growth, 97, HD, per_norm_eps=True)
    new = stage_layouts(shapes, growth, 97, HD)
    sd = trained(old[0][0], fresh_init(old[0][0], 0.02, torch.Generator().manual_seed(0)))
    x, y = batch(97, 5)
    for t in (1, 2):
        grown = grow_state_dict(sd, old[t - 1][0], *old[t], seed=t)
        assert grown.keys() == grow_state_dict(sd, new[t - 1][0], *new[t], seed=t).keys()  # the same weights
        m_old, m_new = model_of(old[t][0], grown), model_of(new[t][0], grown)
        for (name, a), (_, b) in zip(m_old.named_modules(), m_new.named_modules()):
            if isinstance(a, RMSNorm):  # the formula of the code before: eps × H_born / H
                spec_rows = [s for s in (old[t][0].hidden if name == "norm" else
                                         old[t][0].blocks[int(name.split(".")[1])].hidden)]
                assert a.eps == pytest.approx(EPS * spec_rows[0].size / total(spec_rows), rel=1e-12)
        assert abs(m_old(x, y).item() - model_of(old[t - 1][0], sd)(x, y).item()) <= 1e-5
        sd = trained(old[t][0], grown, seed=10 * t)
    assert model_norm_eps(old[0][0], EPS) == EPS  # stage 0: one epsilon either way
    with pytest.raises(ValueError, match="different epsilons"):
        model_norm_eps(old[1][0], EPS)  # blocks born at 48 wide beside norms born at 32
    # growth.json of stage 1 tells the two apart: no key = grown before one-epsilon norms
    assert keeps_per_norm_eps({"loss_prev_model": 1.0}) and not keeps_per_norm_eps(None)
    assert not keeps_per_norm_eps({"norm_eps": ONE_EPS})


# --------------------------------------------------------------------------- export, in process
@pytest.fixture(scope="module")
def curriculum(tok):
    """Weights of three stages: fresh (trained), depth-grown, width-grown (each trained a little)."""
    V = tok.get_vocab_size()
    shapes = [Shape(2, 32, 4, 48), Shape(4, 32, 4, 48), Shape(4, 48, 6, 96)]
    layouts = stage_layouts(shapes, [None] + [("identity", "interleave")] * 2, V, HD)
    sd = trained(layouts[0][0], fresh_init(layouts[0][0], 0.02, torch.Generator().manual_seed(0)))
    out = [(layouts[0][0], sd)]
    for t in (1, 2):
        sd = trained(layouts[t][0], grow_state_dict(sd, layouts[t - 1][0], *layouts[t], seed=t), seed=t)
        out.append((layouts[t][0], sd))
    return out


def model_cfg(layout):
    return ModelConfig(layout.n_layers, layout.d_model, layout.n_heads, layout.d_ffn, HD, SEQ, norm_eps=EPS)


@pytest.mark.parametrize("s,what", [(0, "fresh"), (1, "depth-grown"), (2, "width-grown")])
def test_every_stage_exports_and_transformers_gives_our_logits(curriculum, tok, tmp_path, s, what):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layout, sd = curriculum[s]
    shard = 40_000 if s == 2 else X.MAX_SHARD_BYTES  # the width-grown one in several shards
    out = X.export_model(sd, layout, model_cfg(layout), tok, tmp_path / "hf", max_shard_bytes=shard)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (
        layout.d_model, layout.n_layers, layout.d_ffn)
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == layout.n_heads
    assert cfg["rms_norm_eps"] == pytest.approx(EPS * 32 / layout.d_model)
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == tok.token_to_id(D.EOS)
    assert (out / "model.safetensors.index.json").exists() == (s == 2)
    if s == 2:  # transformers' sharding: at most max_shard_bytes of tensors a file, unless one tensor alone is bigger
        from safetensors import safe_open

        files = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(files) > 2 and files[-1].name.endswith(f"-of-{len(files):05d}.safetensors")
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                sizes = [h.get_tensor(k).nbytes for k in h.keys()]
                assert h.metadata() == {"format": "pt"}
            assert sum(sizes) <= shard or len(sizes) == 1, (f.name, sizes)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    x, _ = batch(layout.vocab, 7)
    with torch.no_grad():
        diff = (hf(x).logits - model_of(layout, sd).eval()(x)).abs().max().item()
    assert diff <= 1e-4, (what, diff)
    # the exported tokenizer encodes like ours; by default with <|endoftext|> in front, as we score
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    eos = tok.token_to_id(D.EOS)
    for text in ["3 plus 4 is 7.", "the cat sat on the mat", "  odd   spacing\nand lines ünïcode"]:
        ids = tok.encode(text).ids
        assert hf_tok(text, add_special_tokens=False).input_ids == ids
        assert hf_tok(text).input_ids == [eos] + ids
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.eos_token == D.EOS and hf_tok.eos_token_id == eos


def test_bf16_export_and_a_model_with_per_norm_epsilons_is_refused(curriculum, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    layout, sd = curriculum[2]
    out = X.export_model(sd, layout, model_cfg(layout), tok, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(hf.parameters()).dtype == torch.bfloat16
    x, _ = batch(layout.vocab, 3)
    with torch.no_grad():
        ours = model_of(layout, sd).eval()(x)
        assert (hf.float()(x).logits - ours).abs().max().item() <= 0.05 * ours.abs().max().item()
    old = stage_layouts([Shape(2, 32, 4, 48), Shape(3, 48, 6, 96)], [None, ("identity", "top")], layout.vocab, HD,
                        per_norm_eps=True)
    with pytest.raises(ValueError, match="not a standard LLaMA"):
        X.export_model(fresh_init(old[1][0], 0.02, torch.Generator()), old[1][0], model_cfg(old[1][0]), tok,
                       tmp_path / "old")


# --------------------------------------------------------------------------- a run directory
def write_config(root, extra_stage0=None, tokenizer=None, **stage0_model):
    raw = {
        "run": {"name": "hf", "seed": 1}, "tokenizer": tokenizer or {"vocab_size": 300},
        "wandb": {"mode": "disabled"},
        "defaults": {"model": {"head_dim": HD, "seq_len": SEQ},
                     "train": {"nproc": 1, "eval_tokens": 512, "tokens": 4096, "micro_batch": 4}},
        "stages": [
            {"name": "a", "data": [{"path": "synthetic:level0"}],
             "model": {"layers": 2, "hidden": 32, "heads": 4, "ffn": 48, **stage0_model}, **(extra_stage0 or {})},
            {"name": "b", "data": [{"path": "synthetic:level0"}], "model": {"layers": 3, "hidden": 48, "heads": 6,
                                                                           "ffn": 96}},
        ],
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return load_config(root / "cfg.yaml")


def train_stage_in_process(cfg, run, s, steps=8):
    """What a stage does to its weights, in this process: its start weights (stage 0's init/, else
    the previous model.pt grown as the ranks grow it) → a few Adam steps → model.pt."""
    prepare_stage(cfg, run, s)
    sdir = RD.stage_dir(run, cfg, s)
    plan = RD.run_plan(run, cfg, D.load_tokenizer(RD.tokenizer_path(run)).get_vocab_size())
    if s == 0:
        init = RD.Weights(RD.weights_at(sdir, RD.INIT_DIR)).load()
    else:
        g = cfg.stages[s].growth
        init = grow_state_dict(RD.Weights(RD.weights_at(RD.stage_dir(run, cfg, s - 1))).load(), plan.layout(s - 1),
                               plan.layout(s), plan.layouts[s][1], depth=g.depth, init=g.init,
                               init_std=cfg.stages[s].model.init_std, seed=cfg.run.seed * 1000 + s)
    m = plan.model(s)
    m.load_state_dict(init)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    x, y = batch(plan.layout(s).vocab, 100 * s)  # one batch: its loss must fall
    for _ in range(steps):
        opt.zero_grad()
        loss = m(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    RD.write_atomic(sdir / RD.MODEL, {k: v.detach().clone() for k, v in m.state_dict().items()})
    return losses


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfrun")
    cfg = write_config(root)
    run = RD.open_run_dir(cfg, root / "run")
    DP.prepare_data(cfg, run)
    for s in (0, 1):
        train_stage_in_process(cfg, run, s)
    return run


def test_export_command_on_a_run_dir_and_a_stage_dir(run, tmp_path, capsys):
    ap = argparse.ArgumentParser()
    CMD.add_export_command(ap.add_subparsers())
    args = ap.parse_args(["export", str(run), "--hf", str(tmp_path / "last"), "--check"])
    assert args.fn(args) == 0  # the last finished stage, and transformers' logits checked against ours
    assert "max |logit difference|" in capsys.readouterr().out
    assert json.loads((tmp_path / "last" / "config.json").read_text())["num_hidden_layers"] == 3
    assert RD.read_json(run / "stages" / "01_b" / RD.GROWTH)["norm_eps"] == ONE_EPS  # recorded at growth
    out, s = X.export_path(run / "stages" / "00_a", tmp_path / "first")
    assert s == 0 and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    # the stage-end callback's default place: RUN/stages/NN_name/hf
    assert X.export_stage(run, 1) == run / "stages" / "01_b" / X.HF_DIR
    with pytest.raises(RD.RunDirError, match="not a run directory"):
        X.export_path(run / "data", tmp_path / "x")
    # a run grown before one-epsilon norms (growth.json without the key) keeps per-norm epsilons:
    # its stage 0 exports, its grown stage (a block born 48 wide beside norms born 32 wide) cannot
    g = run / "stages" / "01_b" / RD.GROWTH
    saved = g.read_text()
    try:
        g.write_text(json.dumps({k: v for k, v in json.loads(saved).items() if k != "norm_eps"}))
        assert RD.run_plan(run, RD.load_run_config(run), 10).per_norm_eps
        X.export_stage(run, 0, tmp_path / "old0")
        with pytest.raises(RD.RunDirError, match="different epsilons"):
            X.export_stage(run, 1, tmp_path / "old1")
    finally:
        g.write_text(saved)


def test_lm_eval_gives_our_log_likelihoods_and_acc(run, tmp_path, monkeypatch):
    items = [{"question": f"what is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), "the mat", "cats"],
              "answer": (a + b) % 4} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 3), (4, 4), (6, 1), (2, 5)]]
    exam = tmp_path / "exam.jsonl"
    exam.write_text("".join(json.dumps(it) + "\n" for it in items))
    model, tok, _, _ = ER.load_model(run / "stages" / "01_b", device="cpu")
    ours = score_multiple_choice(model, tok, items, SEQ, details=True)
    names, include = LE.resolve_tasks(str(exam), tmp_path / "tasks")
    hf_dir = X.export_stage(run, 1, tmp_path / "hf")
    res = LE.run_lm_eval(hf_dir, names, include, samples=True)
    r = res["results"][names[0]]
    assert r["acc,none"] == pytest.approx(ours["acc"]) and r["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    for theirs, mine in zip(res["samples"][names[0]], ours["items"]):
        assert theirs == pytest.approx(mine["loglik"], abs=1e-4)  # the same tokens scored
    assert ours["acc"] == ours["accuracy"]  # lm-eval's names beside ours
    # `llmagogy eval STAGE --lm-eval EXAM` keeps lm-eval's results beside ours in eval.json
    sdir = run / "stages" / "01_b"
    res = ER.evaluate_run(sdir)
    monkeypatch.setattr(LE, "run_lm_eval", lambda hf, names, *a, **k: {"results": {names[0]: {"acc,none": 0.5}}})
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    CMD.add_lm_eval_arguments(ap)
    CMD.lm_eval_for(ap.parse_args([str(sdir), "--lm-eval", str(exam), "--num-fewshot", "0"]), res)
    assert res["lm_eval"]["results"] == {names[0]: {"acc,none": 0.5}}
    stored = RD.read_json(sdir / RD.EVAL)
    assert stored["lm_eval"]["results"] == {names[0]: {"acc,none": 0.5}} and "heldout" in stored
    from llmagogy_ds.evidence.report import _lm_eval_table
    from llmagogy_ds.evidence.runs import Stage, Curriculum

    table = "\n".join(_lm_eval_table(Curriculum(run, "hf", [Stage(1, "b", None, None, 0.0)], 2)))
    assert f"| b | {names[0]} | acc | 0.5000 |" in table


# --------------------------------------------------------------------------- import
def save_hf_llama(path, vocab_tok, **over):
    """A random LlamaForCausalLM saved with transformers, with a tokenizer whose end-of-text token
    is ``</s>`` and whose embedding has 3 spare rows (as many released models do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_tok, special_tokens=["</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = dict(vocab_size=t.get_vocab_size() + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=64,
               tie_word_embeddings=False, eos_token_id=t.token_to_id("</s>"), bos_token_id=t.token_to_id("</s>"))
    cfg.update(over)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # trained-looking norms (gains ≠ 1)
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(str(path))
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", bos_token="</s>").save_pretrained(str(path))
    return hf.eval(), t


def test_hf_llama_imported_as_stage_0_same_logits_then_grows_exactly_and_trains(tmp_path):
    hf, hf_tok = save_hf_llama(tmp_path / "llama", 280)
    cfg = write_config(tmp_path, {"init": {"hf": "llama"}}, {"path": "llama/tokenizer.json"}, norm_eps=1e-5)
    run = RD.open_run_dir(cfg, tmp_path / "run")
    IH.prepare_hf(cfg, run)  # before the data: checks, and the model's tokenizer as the run's
    tok = D.load_tokenizer(RD.tokenizer_path(run))
    eos = hf_tok.token_to_id("</s>")
    assert tok.token_to_id(D.EOS) == eos and tok.get_vocab_size() == hf.config.vocab_size
    assert tok.encode("3 plus 4 is 7").ids == hf_tok.encode("3 plus 4 is 7").ids
    DP.prepare_data(cfg, run)
    prepare_stage(cfg, run, 0)
    init = RD.Weights(RD.weights_at(RD.stage_dir(run, cfg, 0), RD.INIT_DIR)).load()
    plan = RD.run_plan(run, cfg, tok.get_vocab_size())
    ours = plan.model(0)
    ours.load_state_dict(init)
    x, _ = batch(tok.get_vocab_size(), 1)
    with torch.no_grad():
        assert (ours.eval()(x) - hf(x).logits).abs().max().item() <= 1e-4
    assert to_hf(init, plan.layout(0)).keys() == {k for k in hf.state_dict() if "rotary" not in k}
    losses = train_stage_in_process(cfg, run, 0, steps=3)
    # stage 1 grows it (depth and width) exactly, then learns
    losses1 = train_stage_in_process(cfg, run, 1, steps=8)
    prev = plan.model(0)
    prev.load_state_dict(RD.Weights(RD.weights_at(RD.stage_dir(run, cfg, 0))).load())
    with torch.no_grad():  # the first step's loss is the grown model's, on the batch the previous one sees
        assert abs(prev(*batch(tok.get_vocab_size(), 100)).item() - losses1[0]) <= 1e-5
    assert losses1[-1] < losses1[0] and losses[0] > 0
    # and the grown model goes back out as a standard LLaMA
    out = X.export_stage(run, 1, tmp_path / "out")
    model, _, _, _ = ER.load_model(RD.stage_dir(run, cfg, 1), device="cpu")
    assert X.logits_difference(out, model, x) <= 1e-4


BAD = [
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"head_dim": 16}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": 48, "num_attention_heads": 6}, "model.hidden"),
    ({"rms_norm_eps": 1e-6}, "model.norm_eps"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f for _, f in BAD])
def test_what_we_cannot_represent_is_refused_naming_the_field(tmp_path, change, field):
    d = tmp_path / "m"
    d.mkdir()
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps({**base, **change}))
    (d / "tokenizer.json").write_text("{}")
    cfg = write_config(tmp_path, {"init": {"hf": "m"}}, {"path": "m/tokenizer.json"}, norm_eps=1e-5)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        IH.check_init(cfg)  # config.json only: before any weights are read


def test_import_refuses_a_bias_tensor_and_a_tokenizer_that_is_not_the_models(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_llama(tmp_path / "llama", 280)
    w = load_file(str(tmp_path / "llama" / "model.safetensors"))
    w["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(w, str(tmp_path / "llama" / "model.safetensors"), metadata={"format": "pt"})
    cfg = write_config(tmp_path, {"init": {"hf": "llama"}}, {"path": "llama/tokenizer.json"}, norm_eps=1e-5)
    vocab = json.loads((tmp_path / "llama" / "config.json").read_text())["vocab_size"]
    layout = stage_layouts([Shape(2, 32, 4, 48)], [None], vocab, HD)[0][0]
    with pytest.raises(ConfigError, match=r"q_proj\.bias"):
        IH.stage0_weights(cfg, layout)
    with pytest.raises(ConfigError, match="tokenizer: a run whose stage 0 starts from init.hf"):
        IH.check_init(write_config(tmp_path, {"init": {"hf": "llama"}}, norm_eps=1e-5))
    with pytest.raises(ConfigError, match="only stage 0"):
        load_config_with_later_init(tmp_path)


def load_config_with_later_init(root):
    raw = yaml.safe_load((root / "cfg.yaml").read_text())
    raw["stages"][1]["init"] = {"hf": "llama"}
    (root / "cfg2.yaml").write_text(yaml.safe_dump(raw))
    return load_config(root / "cfg2.yaml")


def test_export_and_init_config_keys(tmp_path):
    cfg = write_config(tmp_path)
    assert cfg.export is None and cfg.stages[0].init.hf is None
    raw = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    raw["export"] = {"dtype": "bf16"}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(raw))
    assert (load_config(tmp_path / "e.yaml").export.hf, load_config(tmp_path / "e.yaml").export.dtype) == (True, "bf16")
    raw["export"] = {"dtype": "fp16"}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="export.dtype: must be one of fp32, bf16"):
        load_config(tmp_path / "e.yaml")
    with pytest.raises(ConfigError, match=r"init\.hf: not a Hugging Face model directory"):
        write_config(tmp_path, {"init": {"hf": "nowhere"}})


def test_state_dict_maps_both_ways(curriculum):
    layout, sd = curriculum[2]
    back = from_hf(to_hf(sd, layout), stage_layouts([Shape(4, 48, 6, 96)], [None], layout.vocab, HD)[0][0])
    assert sum(v.numel() for v in back.values()) == sum(v.numel() for v in sd.values())
    assert math.isclose(sum(v.double().sum().item() for v in back.values()),
                        sum(v.double().sum().item() for v in sd.values()), rel_tol=1e-9)
