"""Adam moments across growth: gathered per parameter, grown, restored into the next engine."""
import math

import pytest
import torch

from llmagogy_ds.config import TrainConfig
from llmagogy_ds.model.generations import GenerationLR, multipliers, param_groups
from llmagogy_ds.model.growth import grow_moments, grow_state_dict
from llmagogy_ds.model.layout import Shape, param_generations, stage_layouts
from llmagogy_ds.model.gpt import GPT, fresh_init
from llmagogy_ds.parallel.optim_state import gather_moments, restore_moments
from llmagogy_ds.parallel.engine import initialize

VOCAB, HD, SEQ = 89, 8, 16
LAYOUTS = stage_layouts([Shape(2, 32, 4, 48), Shape(3, 48, 6, 64)], [None, ("identity", "interleave")], VOCAB, HD)


def engine_for(stage, sd, zero, freezes=(1.0, 0.5)):
    model = GPT(LAYOUTS[stage][0], SEQ)
    model.load_state_dict(sd)
    train = TrainConfig(lr=1e-3, micro_batch=4, zero_stage=zero, weight_decay=0.0, tokens=1)
    groups = param_groups(model, param_generations(LAYOUTS[stage][0]), multipliers(list(freezes), stage), 0.0)
    engine, _, _ = initialize(model, groups, train, lambda o: GenerationLR(o, 1e-3, 100, 0, "constant"))
    return engine


def steps(engine, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        xy = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
        engine.backward(engine(xy[:, :-1], xy[:, 1:]))
        engine.step()


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_moments_carry_across_growth(zero, dist_world1):
    sd0 = fresh_init(LAYOUTS[0][0], 0.02, torch.Generator().manual_seed(0))
    e0 = engine_for(0, sd0, zero)
    steps(e0, 3)
    got = gather_moments(e0)
    assert got["steps"] == {0: 3}
    assert set(got["moments"]) == set(param_generations(LAYOUTS[0][0]))
    assert all(v["exp_avg_sq"].abs().sum() > 0 for v in got["moments"].values())

    grown_m = grow_moments(got["moments"], LAYOUTS[0][0], *LAYOUTS[1])
    sd1 = grow_state_dict(sd0, LAYOUTS[0][0], *LAYOUTS[1], seed=1)
    e1 = engine_for(1, sd1, zero)
    assert restore_moments(e1, {"moments": grown_m, "steps": got["steps"]}) == len(grown_m)
    back = gather_moments(e1)
    gens = param_generations(LAYOUTS[1][0])
    c = math.sqrt(32 / 48)
    for name, gen in gens.items():
        if name in grown_m:  # an old piece: its moments, rescaled for norm gains
            src = name if not name.startswith("blocks.") else None
            assert gen == 0
            assert torch.allclose(back["moments"][name]["exp_avg"], grown_m[name]["exp_avg"])
            if name.startswith("norm."):
                assert torch.allclose(grown_m[name]["exp_avg"], got["moments"][src]["exp_avg"] / c)
        else:  # a new piece starts with zero moments
            assert gen == 1
            assert back["moments"][name]["exp_avg"].abs().max() == 0
    assert back["steps"] == {0: 3, 1: 0}
    # the carried state trains on without error
    steps(e1, 1, seed=1)


def test_reset_is_config_switch():
    from llmagogy_ds.config import GrowthConfig

    assert GrowthConfig().optimizer == "carry"
