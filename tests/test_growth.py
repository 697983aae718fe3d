"""Growth operators: function preservation, old tensors kept, new tensors trainable."""
import math

import pytest
import torch

from llmagogy_ds.model.growth import grow_state_dict
from llmagogy_ds.model.layout import Shape, param_generations, stage_layouts, total
from llmagogy_ds.model.gpt import GPT, fresh_init

VOCAB, HD, SEQ = 97, 8, 32
torch.set_num_threads(1)

# (name, shapes of 3 stages): each operator alone, and depth + width together
CASES = {
    "depth": [Shape(2, 32, 4, 48), Shape(4, 32, 4, 48), Shape(6, 32, 4, 48)],
    "hidden+heads": [Shape(2, 32, 4, 48), Shape(2, 48, 6, 48), Shape(2, 64, 8, 48)],
    "ffn": [Shape(2, 32, 4, 48), Shape(2, 32, 4, 80), Shape(2, 32, 4, 112)],
    "odd-units": [Shape(2, 24, 3, 40), Shape(2, 32, 4, 43), Shape(3, 40, 5, 47)],
    "depth+width": [Shape(2, 32, 4, 48), Shape(3, 48, 6, 96), Shape(5, 64, 8, 128)],
}


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def trained_like(layout, seed):
    """A stage-end model: fresh init plus a perturbation (norm gains ≠ 1, no zeros)."""
    sd = fresh_init(layout, 0.02, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def loss_of(layout, sd, x, y):
    m = GPT(layout, SEQ)
    m.load_state_dict(sd)
    return m, m(x, y)


def silent_at_first_step(name, layout, gen):
    """New tensors that provably get no gradient on step 1 under exact preservation.

    The residual's new dimensions are exactly zero, so (a) readers of them and (b) RMSNorm
    gains of new dimensions see zeros; (c) the gains in front of a brand-new block scale
    both twins of every unit alike, so the block stays silent whatever the gain; (d) a
    single new unit has no twin: its output weights are zero, so its input weights wait.
    """
    parts = name.split(".")
    piece = parts[-1]
    if parts[0] == "blocks":
        b = layout.blocks[int(parts[1])]
        if b.born == gen and parts[2] in ("attn_norm", "ffn_norm"):
            return True
        if parts[-2] in ("wq", "wk", "wv", "w1", "w3"):
            units = b.heads if parts[-2] in ("wq", "wk", "wv") else b.ffn
            row = int(piece[1:].split("c")[0])
            if units[row].gen == gen and units[row].size == 1:
                return True
        hidden = b.hidden
    else:
        hidden = layout.hidden
    new_hidden = [i for i, s in enumerate(hidden) if s.gen == gen and i > 0]
    if piece.startswith("s"):  # a norm gain segment
        return int(piece[1:]) in new_hidden
    col = int(piece.split("c")[1])
    reader = parts[-2] in ("wq", "wk", "wv", "w1", "w3", "lm_head")
    return reader and col in new_hidden


@pytest.mark.parametrize("depth,placement,init", [
    ("identity", "interleave", "mirror"), ("identity", "top", "mirror"), ("identity", "bottom", "mirror"),
    ("identity", "interleave", "zero"),
])
@pytest.mark.parametrize("case", list(CASES))
def test_growth_preserves_function_twice(case, depth, placement, init):
    shapes = CASES[case]
    layouts = stage_layouts(shapes, [None, (depth, placement), (depth, placement)], VOCAB, HD)
    x, y = batch()
    sd = trained_like(layouts[0][0], 0)
    for t in (1, 2):
        prev_layout, (layout, origins) = layouts[t - 1][0], layouts[t]
        _, before = loss_of(prev_layout, sd, x, y)
        grown = grow_state_dict(sd, prev_layout, layout, origins, depth=depth, init=init, seed=t)
        model, after = loss_of(layout, grown, x, y)
        assert abs(after.item() - before.item()) <= 1e-5, (case, t, before.item(), after.item())

        # old tensors are carried bitwise, except RMSNorm gains rescaled by sqrt(H_old/H_new)
        gens = param_generations(layout)
        scale = math.sqrt(total(prev_layout.hidden) / total(layout.hidden))
        for i, o in enumerate(origins):
            if o.old is None:
                continue
            for k in sd:
                if k.startswith(f"blocks.{o.old}."):
                    new_k = f"blocks.{i}." + k.split(".", 2)[2]
                    want = sd[k] * scale if "_norm" in k else sd[k]
                    assert torch.allclose(grown[new_k], want, rtol=0, atol=1e-7 if "_norm" in k else 0), new_k

        # every new tensor learns: a gradient on step 1 (all but the provably silent ones),
        # and on step 2 for all
        after.backward()
        new = [n for n, g in gens.items() if g == t]
        assert new, "growth added no tensor"
        params = dict(model.named_parameters())
        for n in new:
            silent = init == "zero" or silent_at_first_step(n, layout, t)
            if not silent:
                assert params[n].grad.abs().max() > 0, f"{n} has no gradient on the first step"
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt.step()
        opt.zero_grad()
        model(x, y).backward()
        for n in new:
            assert params[n].grad.abs().max() > 0, f"{n} has no gradient on the second step"
        # the next transition grows a model that trained a little
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_mirror_first_step_gradients_reach_input_side_of_new_blocks():
    """With init=mirror, a new block's q/k/v and gate/up get a gradient on step 1
    (with init=zero they do not: zero output weights block it)."""
    layouts = stage_layouts([Shape(2, 32, 4, 48), Shape(3, 32, 4, 48)], [None, ("identity", "top")], VOCAB, HD)
    sd = trained_like(layouts[0][0], 3)
    x, y = batch(1)
    for init, expect in (("mirror", True), ("zero", False)):
        grown = grow_state_dict(sd, layouts[0][0], *layouts[1], init=init, seed=1)
        model, loss = loss_of(layouts[1][0], grown, x, y)
        loss.backward()
        for w in ("attn.wq", "attn.wk", "attn.wv", "ffn.w1", "ffn.w3"):
            g = model.get_parameter(f"blocks.2.{w}.r0c0").grad
            assert bool(g.abs().max() > 0) == expect, (init, w)


def test_stack_copies_trained_blocks():
    layouts = stage_layouts([Shape(2, 32, 4, 48), Shape(4, 32, 4, 48)], [None, ("stack", "top")], VOCAB, HD)
    sd = trained_like(layouts[0][0], 5)
    layout, origins = layouts[1]
    grown = grow_state_dict(sd, layouts[0][0], layout, origins, depth="stack", seed=1)
    for i, o in enumerate(origins):
        if o.old is None:
            assert o.copy_of is not None
            for k in sd:
                if k.startswith(f"blocks.{o.copy_of}."):
                    assert torch.equal(grown[f"blocks.{i}." + k.split(".", 2)[2]], sd[k])
    x, y = batch()
    _, before = loss_of(layouts[0][0], sd, x, y)
    _, after = loss_of(layout, grown, x, y)
    assert abs(after.item() - before.item()) > 1e-4  # stack is not function-preserving


@pytest.mark.parametrize("placement,expected", [
    ("interleave", [0, None, 1, None]), ("top", [0, 1, None, None]), ("bottom", [None, None, 0, 1]),
])
def test_placement(placement, expected):
    layouts = stage_layouts([Shape(2, 32, 4, 48), Shape(4, 32, 4, 48)], [None, ("identity", placement)], VOCAB, HD)
    assert [o.old for o in layouts[1][1]] == expected
    assert [b.born for b in layouts[1][0].blocks] == [0 if e is not None else 1 for e in expected]


def test_every_tensor_has_one_generation():
    layouts = stage_layouts(CASES["depth+width"], [None] + [("identity", "interleave")] * 2, VOCAB, HD)
    for s, (layout, _) in enumerate(layouts):
        model = GPT(layout, SEQ)
        gens = param_generations(layout)
        assert [n for n, _ in model.named_parameters()] == list(gens)
        assert set(gens.values()) == set(range(s + 1))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        # assembled weights have the stage's full shape
        assert model.blocks[0].attn.wq.weight().shape == (CASES["depth+width"][s].hidden,) * 2
        assert model.blocks[0].ffn.w2.weight().shape == (CASES["depth+width"][s].hidden, CASES["depth+width"][s].ffn)
        assert all(len(v) in (1, 2) for v in shapes.values())
