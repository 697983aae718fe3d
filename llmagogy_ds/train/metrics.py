"""Metrics: ``metrics.jsonl`` per stage, wandb (one run per stage, grouped by curriculum),
and a rank-0 progress bar. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

from llmagogy_ds import rundir as RD


def read_records(path: Path):
    """The records of a ``metrics.jsonl``, in file order; a line torn by a kill (or being written
    right now) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    def __init__(self, stage_dir: Path, rank: int, wandb_cfg, run_name: str, stage_name: str,
                 total_steps: int, start_step: int, config: dict | None = None):
        self.rank = rank
        self.file = None
        self.wandb = None
        self.bar = None
        if rank != 0:
            return
        self.file = open(stage_dir / RD.METRICS, "a")
        if wandb_cfg.mode != "disabled":
            self.wandb = self._wandb(stage_dir, wandb_cfg, run_name, stage_name, config)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage_name, unit="step", dynamic_ncols=True,
                        mininterval=2.0)

    @staticmethod
    def _wandb(stage_dir: Path, cfg, run_name: str, stage_name: str, config):
        import wandb

        # the run id lives in the stage dir so a resumed stage continues the same wandb run
        id_file = stage_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or run_name,
                          name=f"{run_name}/{stage_name}", id=run_id, resume="allow", mode=cfg.mode,
                          dir=str(stage_dir.parent.parent), config=config, job_type="stage",
                          settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict, step: int) -> None:
        if self.rank != 0:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def progress(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
