"""Grouped-query attention (``model.kv_heads``): the layout and the model, exact growth of heads
and kv heads (mirror twins whole groups), config errors, parameters and FLOPs, Hugging Face
export/import. tp=2 parity with tp=1 runs in tests/parallel_check.py (test_parallel.py)."""
import copy
import json

import pytest
import torch

from llmagogy_ds.config import ConfigError, ModelConfig, approx_params, config_from_dict
from llmagogy_ds.interop.hf import from_hf
from llmagogy_ds.model.flops import flops_per_token, matmul_params
from llmagogy_ds.model.gpt import GPT, fresh_init
from llmagogy_ds.model.growth import grow_state_dict, grow_through
from llmagogy_ds.model.layout import Shape, n_params, param_generations, stage_layouts
from llmagogy_ds.parallel.tensor_parallel import check_divisible

torch.set_num_threads(1)
HD, SEQ, V = 8, 16, 64
GROWTH = [None, ("identity", "interleave"), ("identity", "top")]


def batch(seed=0, n=3):
    x = torch.randint(0, V, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def loss_of(layout, sd, eps=1e-5):
    m = GPT(layout, SEQ, norm_eps=eps)
    m.load_state_dict(sd)
    with torch.no_grad():
        return float(m(*batch()))


def trained(layout, sd, steps=4):
    """A few Adam steps, so new pieces leave their exact start (twins stop being twins)."""
    m = GPT(layout, SEQ)
    m.load_state_dict(sd)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for k in range(steps):
        opt.zero_grad()
        m(*batch(k + 1)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


CASES = {  # group size 2, 3 and 4; odd numbers of new groups (the odd group out gets zero output)
    "group2": [Shape(2, 32, 4, 48, 2), Shape(3, 48, 6, 64, 3), Shape(4, 80, 10, 96, 5)],
    "group3": [Shape(2, 48, 6, 48, 2), Shape(2, 96, 12, 64, 4), Shape(3, 120, 15, 64, 5)],
    "group4-depth-only": [Shape(2, 64, 8, 48, 2), Shape(4, 64, 8, 48, 2), Shape(5, 96, 12, 64, 3)],
}


@pytest.mark.parametrize("init", ["mirror", "zero"])
@pytest.mark.parametrize("case", list(CASES))
def test_heads_and_kv_heads_grow_exactly(case, init):
    layouts = stage_layouts(CASES[case], GROWTH, V, HD)
    sd = trained(layouts[0][0], fresh_init(layouts[0][0], 0.05, torch.Generator().manual_seed(0)))
    for t in (1, 2):
        before = loss_of(layouts[t - 1][0], sd)
        grown = grow_state_dict(sd, layouts[t - 1][0], *layouts[t], init=init, seed=t)
        assert abs(loss_of(layouts[t][0], grown) - before) <= 1e-5, (case, t)
        sd = trained(layouts[t][0], grown)
    lay = layouts[-1][0]
    assert lay.n_kv_heads == CASES[case][-1].kv_heads and lay.blocks[0].group == lay.n_heads // lay.n_kv_heads


def test_mirror_twins_whole_groups_and_every_new_piece_is_the_new_generation():
    shapes = [Shape(2, 32, 4, 48, 2), Shape(2, 64, 8, 48, 4)]  # 2 new groups of 2 heads: one twin pair
    layouts = stage_layouts(shapes, GROWTH[:2], V, HD)
    sd = fresh_init(layouts[0][0], 0.05, torch.Generator().manual_seed(0))
    g = grow_state_dict(sd, layouts[0][0], *layouts[1], init="mirror", seed=1)
    # new kv heads 2, 3 (pieces r1*) and new query heads 4..7; group size 2: heads 4, 5 -> kv 2, heads 6, 7 -> kv 3
    wq, wk, wv, wo = (g[f"blocks.0.attn.{w}.r1c1"] for w in ("wq", "wk", "wv", "wo"))
    assert wk.shape == wv.shape == (2 * HD, 32) and wq.shape == (4 * HD, 32)
    assert torch.equal(wq[: 2 * HD], wq[2 * HD:])  # the twin groups read the same q ...
    assert torch.equal(wk[:HD], wk[HD:]) and torch.equal(wv[:HD], wv[HD:])  # ... k and v
    assert torch.equal(wo[:, : 2 * HD], -wo[:, 2 * HD:]) and wo.abs().sum() > 0  # and cancel
    gens = param_generations(layouts[1][0])
    for k in g:
        if k not in sd:
            assert gens[k] == 1, k  # every new tensor piece belongs to the new generation
        else:
            assert gens[k] == 0


def test_kv_heads_default_is_plain_attention_and_counts():
    mha = stage_layouts([Shape(2, 32, 4, 48)], [None], V, HD)[0][0]
    gqa = stage_layouts([Shape(2, 32, 4, 48, 2)], [None], V, HD)[0][0]
    assert mha.n_kv_heads == 4 and mha.blocks[0].kv_heads == () and gqa.n_kv_heads == 2
    # wk and wv lose half their rows: 2 layers x 2 matrices x (2 heads x HD) x hidden
    assert n_params(mha) - n_params(gqa) == 2 * 2 * 2 * HD * 32
    assert matmul_params(mha) - matmul_params(gqa) == 2 * 2 * 2 * HD * 32
    # attention scores and values are per query head: only the k/v projections get cheaper
    assert flops_per_token(mha, SEQ) - flops_per_token(gqa, SEQ) == 6 * (n_params(mha) - n_params(gqa))
    m = ModelConfig(2, 32, 4, 48, HD, SEQ, kv_heads=2)
    assert approx_params(m, V) == n_params(gqa)


def test_hf_export_import_roundtrip_with_fewer_kv_heads(tmp_path):
    """A grown GQA model exported (llmagogy's export: config.json, safetensors, tokenizer) loads in
    transformers with num_key_value_heads = kv_heads and gives our logits; imported back as a
    stage-0 layout it is the same function."""
    from transformers import AutoModelForCausalLM

    from llmagogy_ds.data import corpus as D
    from llmagogy_ds.interop import export as X
    from llmagogy_ds.interop import import_hf as IH

    tok = D.train_tokenizer([f"{a} plus {b} is {a + b}." for a in range(20) for b in range(20)], 300, 1)
    vocab = tok.get_vocab_size()
    layouts = stage_layouts(CASES["group2"], GROWTH, vocab, HD)
    sd = grow_through(fresh_init(layouts[0][0], 0.05, torch.Generator().manual_seed(0)), layouts, 2)
    lay = layouts[2][0]
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}  # trained-looking: twins no longer equal
    mc = ModelConfig(lay.n_layers, lay.d_model, lay.n_heads, lay.d_ffn, HD, SEQ, kv_heads=lay.n_kv_heads)
    out = X.export_model(sd, lay, mc, tok, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (10, 5)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    x = torch.randint(0, vocab, (3, SEQ), generator=torch.Generator().manual_seed(3))
    ours = GPT(lay, SEQ)
    ours.load_state_dict(sd)
    with torch.no_grad():
        assert (hf(x).logits - ours.eval()(x)).abs().max().item() <= 1e-4
        # back in: a stage-0 layout of the same shape (its one epsilon is HF's), the same logits
        flat = stage_layouts([CASES["group2"][-1]], [None], vocab, HD)[0][0]
        back = GPT(flat, SEQ, norm_eps=cfg["rms_norm_eps"])
        back.load_state_dict(from_hf(IH.load_hf_weights(out), flat))
        assert (back.eval()(x) - ours(x)).abs().max().item() <= 1e-5


BASE = {
    "run": {"name": "t"}, "tokenizer": {"vocab_size": 512},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32}, "train": {"micro_batch": 2, "nproc": 2}},
    "stages": [
        {"name": "a", "data": [{"path": "synthetic:level0"}], "train": {"tokens": 10000},
         "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 64}},
        {"name": "b", "data": [{"path": "synthetic:level1"}], "train": {"tokens": 20000},
         "model": {"layers": 3, "hidden": 128, "heads": 8, "kv_heads": 4, "ffn": 128}},
    ],
}


def errors(tmp_path, **changes):
    raw = copy.deepcopy(BASE)
    for path, value in changes.items():
        where = raw
        *head, last = path.split("__")
        for k in head:
            where = where[int(k)] if k.isdigit() else where[k]
        where[last] = value
    try:
        config_from_dict(raw, tmp_path)
    except ConfigError as e:
        return str(e)
    return ""


def test_config_kv_heads_checks(tmp_path):
    assert errors(tmp_path) == ""
    assert "stages[0] (a).model.kv_heads: must divide heads=4" in errors(tmp_path, stages__0__model__kv_heads=3)
    assert "must divide heads=4" in errors(tmp_path, stages__0__model__kv_heads=0)
    msg = errors(tmp_path, stages__1__model__kv_heads=2)
    assert "stages[1] (b).model.kv_heads: heads / kv_heads changes from 4 / 2 to 8 / 2" in msg
    # tp=2: each generation's kv heads split over the TP ranks
    msg = errors(tmp_path, stages__0__model__kv_heads=1, stages__1__model__kv_heads=2,
                 stages__1__train={"tokens": 20000, "tp": 2})
    assert "stage a adds 1 kv heads, not divisible by tp=2" in msg
    assert errors(tmp_path, stages__1__train={"tokens": 20000, "tp": 2}) == ""
    cfg = config_from_dict(copy.deepcopy(BASE), tmp_path)
    assert cfg.stages[1].model.kv_heads == 4
    from llmagogy_ds.model.stages import Plan

    assert Plan(cfg, 512).layout(1).n_kv_heads == 4


def test_layout_refuses_a_changing_group_and_tp_names_kv_heads():
    with pytest.raises(ValueError, match="heads / kv_heads must stay 2"):
        stage_layouts([Shape(2, 32, 4, 48, 2), Shape(2, 64, 8, 48, 2)], GROWTH[:2], V, HD)
    lay = stage_layouts([Shape(2, 32, 4, 48, 2), Shape(2, 48, 6, 48, 3)], GROWTH[:2], V, HD)[-1][0]
    assert any("generation 1 adds 1 kv heads" in e for e in check_divisible(lay, 2))


def test_plan_activation_formula_matches_autograd_with_fewer_kv_heads():
    """``plan``'s activation bytes of a grown GQA model are what autograd saves (as
    tests/test_plan.py checks for plain attention): k and v are kv_heads wide."""
    from llmagogy_ds.cluster.memory import estimate_memory
    from llmagogy_ds.model.generations import multipliers

    layouts = stage_layouts(CASES["group3"], GROWTH, V, HD)
    lay = layouts[-1][0]
    model = GPT(lay, SEQ)
    model.load_state_dict(grow_through(fresh_init(layouts[0][0], 0.05, torch.Generator().manual_seed(0)), layouts, 2))
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, y = batch(0, n=2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    est = estimate_memory(lay, multipliers([1.0, 1.0, 1.0], 2), seq_len=SEQ, micro_batch=2, precision="fp32")
    mha = estimate_memory(stage_layouts([Shape(s.layers, s.hidden, s.heads, s.ffn) for s in CASES["group3"]],
                                        GROWTH, V, HD)[-1][0], multipliers([1.0, 1.0, 1.0], 2), seq_len=SEQ,
                          micro_batch=2, precision="fp32")
    assert est.activations < mha.activations
    assert sum(saved.values()) == pytest.approx(est.activations + est.assembled_weights + 4 * 2 * SEQ * V, rel=0.01)
