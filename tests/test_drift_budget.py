"""Drift-budget F: the measured drift of old generations stays within the budget."""
import json

import pytest

from llmagogy_ds.cli import main
from llmagogy_ds.model.generations import DriftBudget


def test_controller_lowers_only_what_would_exceed():
    sched = lambda t: 1.0  # noqa: E731 (constant schedule)
    b = DriftBudget(budget=0.04, generations=[0, 1], schedule=sched, total_steps=100)
    for t in range(20):
        b.accumulate(t, {0: 1.0, 1: 0.5})
    # after 20 of 100 steps: gen0 drifted 0.1 (projected 0.5 ≫ 0.9·0.2), gen1 0.01 (projected ≈ 0.05)
    new = b.adjust(20, {0: 0.1 ** 2, 1: 0.01 ** 2}, {0: 1.0, 1: 0.5})
    assert new[1] == 0.5
    # gen0's remaining 80 steps at the new multiplier land exactly on margin × √budget
    rate = 0.1 / 20
    assert 0.1 + rate * new[0] * 80 == pytest.approx(0.9 * 0.2)
    # a generation already over budget is stopped
    assert b.adjust(20, {0: 0.25, 1: 0.0}, {0: 1.0, 1: 0.5})[0] == 0.0
    s = b.state_dict()
    b2 = DriftBudget(0.04, [0, 1], sched, 100)
    b2.load_state_dict(json.loads(json.dumps(s)))
    assert b2.lr_done == b.lr_done and len(b2.history) == 2


@pytest.mark.multiprocess
def test_auto_F_keeps_drift_within_budget(tmp_path):
    budget = 0.002  # gen0's drift_sq is about 0.085 with F = 0.5 on this stage: the budget must bite
    sets = ["wandb.mode=disabled", "defaults.train.nproc=1", "defaults.train.eval_every=5",
            "defaults.train.log_every=5", "defaults.train.eval_tokens=4096",
            "stages.nursery.train.tokens=204800", "stages.primary.train.tokens=204800",
            "stages.primary.freeze.auto=true", f"stages.primary.freeze.drift_budget={budget}",
            "stages.primary.freeze.value=1.0"]
    for stage in ("nursery", "primary"):
        args = ["run", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"), "--stage", stage]
        for x in sets:
            args += ["--set", x]
        assert main(args) == 0
    r = json.loads((tmp_path / "run" / "stages" / "01_primary" / "result.json").read_text())
    g0 = r["generations"][0]
    assert g0["drift_sq"] <= budget, g0  # measured on the consolidated final weights
    assert 0.0 < g0["chosen_F"] < 1.0 and g0["multiplier"] == pytest.approx(g0["chosen_F"])
    assert r["drift_budget"]["history"], "the controller never ran"
    assert r["loss_end"] < r["loss_after_growth"]
