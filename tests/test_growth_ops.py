"""Growth operators from the literature: HyperCloning-style width (``init: clone``) and G_stack
depth (``depth: gstack``), their config checks, and F = 0 with cloning."""
import pytest
import torch
import yaml

from llmagogy_ds.config import ConfigError, load_config
from llmagogy_ds.model.generations import multipliers, param_groups
from llmagogy_ds.model.growth import grow_moments, grow_state_dict, preserves_function
from llmagogy_ds.model.layout import Shape, param_generations, stage_layouts
from test_growth import VOCAB, HD, batch, loss_of, trained_like

torch.set_num_threads(1)

CLONE_CASES = {
    "x2 all": [Shape(2, 32, 4, 48), Shape(2, 64, 8, 96)],
    "x3 hidden, ffn kept": [Shape(2, 16, 2, 40), Shape(2, 48, 6, 40)],
    "ffn only": [Shape(2, 32, 4, 48), Shape(2, 32, 4, 144)],
    "x2 + new blocks": [Shape(2, 32, 4, 48), Shape(4, 64, 8, 96)],
    "gqa x2": [Shape(2, 32, 4, 48, kv_heads=2), Shape(2, 64, 8, 96, kv_heads=4)],
}


def two_steps(model, x, y, new):
    """The names among ``new`` without a gradient on step 1, and asserts all have one on step 2."""
    params = dict(model.named_parameters())
    model(x, y).backward()
    silent = [n for n in new if not params[n].grad.abs().max() > 0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad()
    model(x, y).backward()
    for n in new:
        assert params[n].grad.abs().max() > 0, f"{n} has no gradient on the second step"
    return silent


@pytest.mark.parametrize("case", list(CLONE_CASES))
def test_clone_is_exact_and_every_new_tensor_learns(case):
    shapes = CLONE_CASES[case]
    layouts = stage_layouts(shapes, [None, ("identity", "interleave")], VOCAB, HD)
    (prev, _), (layout, origins) = layouts
    x, y = batch(2)
    sd = trained_like(prev, 11)
    _, before = loss_of(prev, sd, x, y)
    grown = grow_state_dict(sd, prev, layout, origins, init="clone", seed=1)
    model, after = loss_of(layout, grown, x, y)
    assert abs(after.item() - before.item()) <= 1e-5, (before.item(), after.item())
    new = [n for n, g in param_generations(layout).items() if g == 1]
    assert new
    # cloned units sit next to their originals with different (noised) values: no two copies
    # stay locked together, and every new tensor gets a gradient on the first step already
    silent = two_steps(model, x, y, new)
    assert silent == [], silent


def test_clone_copies_and_divides_as_described():
    (prev, _), (layout, origins) = stage_layouts(CLONE_CASES["x2 all"], [None, ("identity", "top")], VOCAB, HD)
    sd = trained_like(prev, 4)
    g = grow_state_dict(sd, prev, layout, origins, init="clone", seed=3)
    # embedding: columns repeated, / sqrt(2); gains repeated unchanged
    assert torch.allclose(g["tok_emb.r0c1"], sd["tok_emb.r0c0"] / 2 ** 0.5)
    assert torch.equal(g["blocks.0.attn_norm.s1"], sd["blocks.0.attn_norm.s0"])
    # a reader's copies: W/2 ± n (paired noise, same n with opposite signs)
    a, b = g["blocks.0.attn.wq.r0c0"], g["blocks.0.attn.wq.r0c1"]
    assert torch.allclose(a + b, sd["blocks.0.attn.wq.r0c0"], atol=1e-6)
    assert not torch.allclose(a, b)
    assert torch.allclose(g["blocks.0.attn.wq.r1c0"] + g["blocks.0.attn.wq.r1c1"], sd["blocks.0.attn.wq.r0c0"],
                          atol=1e-6)  # the new heads' rows
    # a writer: rows / sqrt(2) (residual copies), columns / 2 (cloned heads)
    w = g["blocks.0.attn.wo.r1c0"] + g["blocks.0.attn.wo.r1c1"]
    assert torch.allclose(w, sd["blocks.0.attn.wo.r0c0"] / 2 ** 0.5, atol=1e-6)


def test_clone_needs_integer_multiples():
    (prev, _), (layout, origins) = stage_layouts([Shape(2, 32, 4, 48), Shape(2, 48, 6, 48)],
                                                 [None, ("identity", "top")], VOCAB, HD)
    with pytest.raises(ValueError, match="integer width multiples: hidden grows from 32 to 48"):
        grow_state_dict(trained_like(prev, 0), prev, layout, origins, init="clone")


def test_clone_with_F0_trains_only_the_copies_and_keeps_the_grown_old_pieces():
    """F = 0 freezes the old pieces at their grown (divided, noised) values: what `frozen` means
    under cloning; the new generation's copies carry all of the learning."""
    (prev, _), (layout, origins) = stage_layouts(CLONE_CASES["x2 all"], [None, ("identity", "top")], VOCAB, HD)
    grown = grow_state_dict(trained_like(prev, 6), prev, layout, origins, init="clone", seed=1)
    model, _ = loss_of(layout, grown, *batch())
    gens = param_generations(layout)
    groups = param_groups(model, gens, multipliers([1.0, 0.0], 1), 0.0)
    opt = torch.optim.Adam(groups, lr=1e-2)
    x, y = batch(5)
    for _ in range(3):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), grown[n])
        assert moved == (gens[n] == 1), n
    # and their Adam moments are not carried: the grown pieces' gradients have another scale
    moments = {k: {"exp_avg": torch.ones_like(v), "exp_avg_sq": torch.ones_like(v)} for k, v in
               trained_like(prev, 6).items()}
    assert grow_moments(moments, prev, layout, origins, init="clone") == {}
    assert grow_moments(moments, prev, layout, origins, init="mirror")


def test_gstack_stacks_the_whole_trained_stack_on_top():
    shapes = [Shape(2, 32, 4, 48), Shape(6, 32, 4, 48)]
    (prev, _), (layout, origins) = stage_layouts(shapes, [None, ("gstack", "interleave")], VOCAB, HD)
    assert [(o.old, o.copy_of) for o in origins] == [(0, None), (1, None), (None, 0), (None, 1), (None, 0),
                                                     (None, 1)]
    sd = trained_like(prev, 8)
    grown = grow_state_dict(sd, prev, layout, origins, depth="gstack", seed=1)
    for i in range(6):
        for k in sd:
            if k.startswith(f"blocks.{i % 2}."):
                assert torch.equal(grown[f"blocks.{i}." + k.split(".", 2)[2]], sd[k])
    x, y = batch()
    _, before = loss_of(prev, sd, x, y)
    model, after = loss_of(layout, grown, x, y)
    assert abs(after.item() - before.item()) > 1e-4  # G_stack is not function-preserving
    assert not preserves_function("gstack", "mirror") and preserves_function("identity", "clone")
    new = [n for n, g in param_generations(layout).items() if g == 1]
    assert two_steps(model, x, y, new) == []  # copies of trained blocks learn at once


def test_gstack_with_clone_width_in_one_transition():
    shapes = [Shape(2, 32, 4, 48), Shape(4, 64, 8, 96)]
    (prev, _), (layout, origins) = stage_layouts(shapes, [None, ("gstack", "top")], VOCAB, HD)
    grown = grow_state_dict(trained_like(prev, 9), prev, layout, origins, depth="gstack", init="clone", seed=1)
    model, _ = loss_of(layout, grown, *batch())
    for w in ("attn.wq", "attn.wo", "ffn.w2"):  # the new blocks are the cloned old ones, whole
        assert torch.equal(model.get_submodule(f"blocks.2.{w}").weight(), model.get_submodule(f"blocks.0.{w}").weight())
    with pytest.raises(ValueError, match="integer depth multiple: 2 -> 3 layers"):
        stage_layouts([Shape(2, 32, 4, 48), Shape(3, 32, 4, 48)], [None, ("gstack", "top")], VOCAB, HD)


def test_config_names_the_bad_multiple(tmp_path):
    raw = {"run": {"name": "t"}, "tokenizer": {"vocab_size": 512},
           "defaults": {"model": {"head_dim": 16, "seq_len": 32}, "train": {"tokens": 100000, "nproc": 1}},
           "stages": [{"name": "a", "data": [{"path": "synthetic:level0"}],
                       "model": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64}},
                      {"name": "b", "data": [{"path": "synthetic:level1"}],
                       "model": {"layers": 3, "hidden": 48, "heads": 3, "ffn": 128},
                       "growth": {"init": "clone", "depth": "gstack"}}]}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "stages[1] (b).model.hidden: 32 -> 48: growth.init clone needs integer width multiples" in msg
    assert "stages[1] (b).model.heads: 2 -> 3" in msg
    assert "stages[1] (b).model.layers: 2 -> 3: growth.depth gstack needs integer depth multiples" in msg
    assert "model.ffn" not in msg  # 64 -> 128 is a multiple
    raw["stages"][1]["model"] = {"layers": 4, "hidden": 64, "heads": 4, "ffn": 128}
    f.write_text(yaml.safe_dump(raw))
    cfg = load_config(f)
    assert (cfg.stages[1].growth.init, cfg.stages[1].growth.depth) == ("clone", "gstack")
