"""metrics.jsonl and an offline wandb run that a resumed stage continues."""
import json
from types import SimpleNamespace

from llmagogy_ds.model.flops import flops_per_token, matmul_params, mfu
from llmagogy_ds.model.layout import Shape, initial_layout, n_params
from llmagogy_ds.train.metrics import MetricsLogger


def test_jsonl_and_offline_wandb_resume(tmp_path):
    stage_dir = tmp_path / "stages" / "00_a"
    stage_dir.mkdir(parents=True)
    cfg = SimpleNamespace(mode="offline", project="llmagogy-test", entity=None, group=None)
    for step in (1, 2):
        log = MetricsLogger(stage_dir, 0, cfg, "run", "a", total_steps=2, start_step=step - 1)
        log.log({"loss": 1.0 / step, "lr_gen0": 0.5, "bad": float("nan")}, step)
        log.close()
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[1]["loss"] == 0.5 and lines[0]["bad"] is None
    run_id = (stage_dir / "wandb_id").read_text()
    # both starts wrote into the same offline wandb run (resumed by id)
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs, list((tmp_path / "wandb").glob("*"))


def test_non_zero_ranks_write_nothing(tmp_path):
    cfg = SimpleNamespace(mode="offline", project="x", entity=None, group=None)
    log = MetricsLogger(tmp_path, 1, cfg, "run", "a", 2, 0)
    log.log({"loss": 1.0}, 1)
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_flops():
    lay = initial_layout(Shape(2, 64, 4, 176), vocab=512, head_dim=16)
    n = matmul_params(lay)
    assert n == n_params(lay) - 512 * 64
    assert n == 2 * (4 * 64 * 64 + 3 * 64 * 176 + 2 * 64) + 64 + 512 * 64
    assert flops_per_token(lay, 128) == 6 * n + 2 * 12 * 128 * 64
    assert mfu(1e12, 2.0, 2) == 0.25 and mfu(1e12, None, 2) is None
