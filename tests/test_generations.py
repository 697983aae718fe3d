"""Freeze coefficient F → param groups: lr multipliers, frozen generations, Adam's first step."""
import pytest
import torch

from llmagogy_ds.config import TrainConfig
from llmagogy_ds.model.generations import GenerationLR, multipliers, param_groups, schedule_factor
from llmagogy_ds.model.growth import grow_through
from llmagogy_ds.model.layout import Shape, param_generations, stage_layouts
from llmagogy_ds.model.gpt import GPT, fresh_init
from llmagogy_ds.parallel.engine import initialize

VOCAB, HD, SEQ = 101, 8, 32


def test_multipliers_are_products_of_F():
    assert multipliers([1.0, 0.5, 0.5, 0.5], 3) == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    assert multipliers([1.0, 0.0, 0.5], 2) == {0: 0.0, 1: 0.5, 2: 1.0}
    assert multipliers([1.0, 0.5, 0.0], 2) == {0: 0.0, 1: 0.0, 2: 1.0}


def test_schedule():
    assert schedule_factor(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert schedule_factor(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert schedule_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert schedule_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert schedule_factor(70, 100, 0, "constant", 0.1) == 1.0


def grown_model(freezes):
    shapes = [Shape(2, 32, 4, 48), Shape(3, 48, 6, 64), Shape(4, 64, 8, 96)]
    layouts = stage_layouts(shapes, [None] + [("identity", "interleave")] * 2, VOCAB, HD)
    sd = grow_through(fresh_init(layouts[0][0], 0.02, torch.Generator().manual_seed(0)), layouts, 2)
    model = GPT(layouts[2][0], SEQ)
    model.load_state_dict(sd)
    return model, param_generations(layouts[2][0]), multipliers(freezes, 2)


def test_param_groups_freeze_and_split():
    model, gen_of, mults = grown_model([1.0, 0.0, 0.5])
    groups = param_groups(model, gen_of, mults, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"gen1", "gen1_nodecay", "gen2", "gen2_nodecay"}
    for name, p in model.named_parameters():
        assert p.requires_grad == (gen_of[name] != 0)
    for g in groups:
        assert g["multiplier"] == mults[g["generation"]] and g["params"]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("nodecay") else 0.1)


def test_scheduler_keeps_multipliers():
    model, gen_of, mults = grown_model([1.0, 0.5, 0.5])
    opt = torch.optim.AdamW(param_groups(model, gen_of, mults, 0.0), lr=1.0)
    sched = GenerationLR(opt, 1e-3, total_steps=50, warmup=5)
    for _ in range(7):
        sched.step()
    f = schedule_factor(7, 50, 5, "cosine", 0.1)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * f * mults[g["generation"]])
    state = sched.state_dict()
    sched.set_multiplier(0, 0.01)
    assert sched.generation_lrs()[0] == pytest.approx(1e-3 * f * 0.01)
    sched.load_state_dict(state)
    assert sched.generation_lrs()[0] == pytest.approx(1e-3 * f * 0.25)


def _full(engine, model):
    """Full fp32 parameters (gathered under ZeRO-3)."""
    import deepspeed

    params = list(model.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_adam_first_step_moves_each_generation_by_its_multiplier(zero_stage, dist_world1):
    freezes = [1.0, 0.0, 0.5]  # gen0 frozen (0 × 0.5), gen1 at 0.5, gen2 at 1
    model, gen_of, mults = grown_model(freezes)
    g = torch.Generator().manual_seed(1)
    xy = torch.randint(0, VOCAB, (8, SEQ + 1), generator=g)
    x, y = xy[:, :-1], xy[:, 1:]
    # the gradient of each element, from a plain copy of the model
    ref = GPT(model.layout, SEQ)
    ref.load_state_dict(model.state_dict())
    ref(x, y).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    lr = 1e-3
    train = TrainConfig(lr=lr, warmup_steps=0, schedule="constant", micro_batch=8, grad_accum=1, zero_stage=zero_stage,
                        weight_decay=0.0, grad_clip=0.0, tokens=1)
    groups = param_groups(model, gen_of, mults, train.weight_decay)
    engine, _, sched = initialize(model, groups, train,
                                  lambda opt: GenerationLR(opt, lr, 10, 0, "constant"))
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    after = _full(engine, engine.module)

    for gen, m in mults.items():
        names = [n for n, gg in gen_of.items() if gg == gen]
        if m == 0:
            assert all(torch.equal(after[n], before[n]) for n in names), "frozen generation moved"
            assert not any(n in grads and engine.module.get_parameter(n).requires_grad for n in names)
            continue
        moved = torch.cat([(after[n] - before[n]).abs().flatten() for n in names])
        # "non-zero" = above Adam's eps scale: g/(|g|+eps) >= 0.99; smaller ones are rounding noise
        mask = torch.cat([(grads[n].abs() > 100 * train.eps).flatten() for n in names])
        ratio = moved[mask].mean().item() / lr
        assert ratio == pytest.approx(m, rel=0.02), (gen, ratio, m)
        exact_zero = torch.cat([(grads[n] == 0).flatten() for n in names])
        assert moved[exact_zero].abs().max().item() == 0.0 if exact_zero.any() else True
