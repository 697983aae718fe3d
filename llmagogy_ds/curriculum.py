"""The curriculum: run directory, per-stage preparation (tokenizer, data, growth), summary.

Run directory::

    RUN/config.yaml                 frozen copy of the (merged, overridden) config
    RUN/tokenizer.json
    RUN/data/<stage>-<fingerprint>/ packed token memmaps, exams
    RUN/stages/NN_<stage>/init.pt   weights the stage starts from (θ_start: fresh or grown)
                         growth.json loss_prev_model, loss_after_growth, exam after growth
                         checkpoints/ DeepSpeed checkpoints (complete ones carry complete.json)
                         metrics.jsonl, model.pt (final fp32 weights), result.json (stage done)
    RUN/summary.json

Everything here runs in one process (rank 0 or the launcher) and writes files atomically,
so it can be re-run after any interruption.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from .config import ConfigError, CurriculumConfig, load_config
from .evaluate import exam_accuracy, heldout_loss
from .generations import multipliers
from .growth import grow_moments, grow_state_dict
from .layout import ModelLayout, Shape, stage_layouts
from .model import GPT, fresh_init


class RunDirError(RuntimeError):
    pass


# --------------------------------------------------------------------------- run dir
def stage_dir(run_dir: Path, cfg: CurriculumConfig, s: int) -> Path:
    return run_dir / "stages" / f"{s:02d}_{cfg.stages[s].name}"


def frozen_config_path(run_dir: Path) -> Path:
    return run_dir / "config.yaml"


def open_run_dir(cfg: CurriculumConfig, run_dir: Path, restart: bool = False) -> Path:
    """Create the run dir with a frozen config, or check that the existing one matches.

    A different frozen config is refused (``--restart`` moves the old run aside; nothing is
    deleted).
    """
    run_dir = Path(run_dir)
    frozen = frozen_config_path(run_dir)
    new = cfg.to_yaml()
    if frozen.exists() and frozen.read_text() != new:
        if not restart:
            import difflib

            diff = "".join(difflib.unified_diff(frozen.read_text().splitlines(True), new.splitlines(True),
                                                "run config", "this config", n=0))
            raise RunDirError(
                f"{run_dir} holds a run with a different config; refusing to mix them.\n{diff}\n"
                "Use another --run-dir, or --restart to move the existing run aside and start over.")
        move_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not frozen.exists():
        _atomic_write(frozen, new)
    return run_dir


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``RUN.old-DATE`` (``--restart``: nothing is deleted)."""
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two restarts within a second must not collide
        aside, n = aside.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    os.replace(run_dir, aside)
    print(f"moved the previous run to {aside}")
    return aside


def load_run_config(run_dir: Path) -> CurriculumConfig:
    frozen = frozen_config_path(run_dir)
    if not frozen.exists():
        raise RunDirError(f"{run_dir}: no config.yaml; start the run with `llmagogy run CONFIG --run-dir {run_dir}`")
    return load_config(frozen)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- model shapes
@dataclass
class Plan:
    """Layouts and lr multipliers of every stage (pure function of config + vocab)."""

    cfg: CurriculumConfig
    vocab: int

    def __post_init__(self):
        st = self.cfg.stages
        shapes = [Shape(s.model.layers, s.model.hidden, s.model.heads, s.model.ffn) for s in st]
        growth = [None] + [(s.growth.depth, s.growth.placement) for s in st[1:]]
        self.layouts = stage_layouts(shapes, growth, self.vocab, st[0].model.head_dim)
        self.freezes = [1.0] + [s.freeze.value for s in st[1:]]

    def layout(self, s: int) -> ModelLayout:
        return self.layouts[s][0]

    def multipliers(self, s: int) -> dict[int, float]:
        return multipliers(self.freezes, s)

    def model(self, s: int) -> GPT:
        m = self.cfg.stages[s].model
        return GPT(self.layout(s), m.seq_len, m.rope_theta, m.norm_eps)


def effective_multipliers(plan: Plan, run_dir: Path, s: int) -> dict[int, float]:
    """lr multipliers at stage ``s``: products of F, where a drift-budget stage (freeze.auto)
    contributes the F it chose for each generation (its result.json) instead of the config's."""
    out = {}
    for g in range(s + 1):
        m = 1.0
        for t in range(g + 1, s + 1):
            f = plan.freezes[t]
            r = stage_result(run_dir, plan.cfg, t) if plan.cfg.stages[t].freeze.auto else None
            if r is not None:
                f = next((e["chosen_F"] for e in r["generations"] if e["generation"] == g and "chosen_F" in e), f)
            m *= f
        out[g] = m
    return out


# --------------------------------------------------------------------------- preparation
def ensure_tokenizer(cfg: CurriculumConfig, run_dir: Path):
    path = run_dir / "tokenizer.json"
    if not path.exists():
        if cfg.tokenizer.path:
            tok = D.load_tokenizer(cfg.tokenizer.path)
        else:
            texts = D.curriculum_texts(cfg, cfg.run.seed, cfg.tokenizer.max_train_bytes)
            tok = D.train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        tmp = path.with_name("tokenizer.json.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return D.load_tokenizer(path), D.file_sha(path)


def stage_data(cfg: CurriculumConfig, run_dir: Path, s: int, tokenizer, tok_sha: str) -> D.StageData:
    return D.prepare_stage_data(cfg.stages[s], tokenizer, tok_sha, run_dir / "data", cfg.run.seed)


def read_exams(data: D.StageData) -> list[dict]:
    items = []
    for src in data.sources:
        if "exam" in src:
            with open(data.root / src["exam"]) as f:
                items += [json.loads(line) for line in f]
    return items


def prepare_data(cfg: CurriculumConfig, run_dir: Path) -> None:
    """Tokenizer and every stage's token cache: all input errors surface before any compute."""
    from . import baseline as B
    from .exams import load_jsonl

    if cfg.eval is not None:  # read and check the eval items now, not at the end of stage 1
        for path in cfg.eval.exams:
            load_jsonl(path, kind="exam")
        for path in cfg.eval.pairs:
            load_jsonl(path, kind="pairs")
        for path in cfg.eval.texts:
            D.check_utf8(Path(path))
    tok, sha = ensure_tokenizer(cfg, run_dir)
    for s in range(len(cfg.stages)):
        stage_data(cfg, run_dir, s, tok, sha)
    B.comparison_data(run_dir, tok, sha)  # a baseline run: the curriculum's held-out sets too


def evaluate_weights(plan: Plan, s_layout: int, weights: dict, windows, exams: list[dict], tokenizer,
                     seq_len: int) -> dict:
    model = plan.model(s_layout)
    model.load_state_dict(weights)
    out = {"heldout_loss": heldout_loss(model, windows)}
    if exams:
        out["exam"] = exam_accuracy(model, tokenizer, exams, seq_len)
    return out


def prepare_stage(cfg: CurriculumConfig, run_dir: Path, s: int) -> Path:
    """Write ``init.pt`` (and ``growth.json``) for stage ``s`` if not there yet; idempotent."""
    sdir = stage_dir(run_dir, cfg, s)
    sdir.mkdir(parents=True, exist_ok=True)
    init = sdir / "init.pt"
    if init.exists():
        return init
    tok, sha = ensure_tokenizer(cfg, run_dir)
    plan = Plan(cfg, tok.get_vocab_size())
    stage = cfg.stages[s]
    seed = cfg.run.seed * 1000 + s
    if s == 0:
        weights = fresh_init(plan.layout(0), stage.model.init_std, torch.Generator().manual_seed(seed))
    else:
        prev_model = stage_dir(run_dir, cfg, s - 1) / "model.pt"
        if not prev_model.exists():
            raise RunDirError(f"stage {stage.name!r} grows from {cfg.stages[s - 1].name!r}, which has not finished "
                              f"({prev_model} missing): run the earlier stage first")
        prev = torch.load(prev_model, map_location="cpu", weights_only=True)
        weights = grow_state_dict(prev, plan.layout(s - 1), plan.layout(s), plan.layouts[s][1],
                                  depth=stage.growth.depth, init=stage.growth.init,
                                  init_std=stage.model.init_std, seed=seed)
        data = stage_data(cfg, run_dir, s, tok, sha)
        windows = D.heldout_windows(data, stage.model.seq_len, stage.train.eval_tokens)
        exams = read_exams(data)
        before = evaluate_weights(plan, s - 1, prev, windows, exams, tok, stage.model.seq_len)
        after = evaluate_weights(plan, s, weights, windows, exams, tok, stage.model.seq_len)
        prev_moments = stage_dir(run_dir, cfg, s - 1) / "moments.pt"
        if stage.growth.optimizer == "carry" and prev_moments.exists():
            m = torch.load(prev_moments, map_location="cpu", weights_only=True)
            grown = grow_moments(m["moments"], plan.layout(s - 1), plan.layout(s), plan.layouts[s][1])
            _atomic_save({"moments": grown, "steps": m["steps"]}, sdir / "init_moments.pt")
        _atomic_write(sdir / "growth.json", json.dumps({
            "loss_prev_model": before["heldout_loss"], "loss_after_growth": after["heldout_loss"],
            "exam_prev_model": before.get("exam"), "exam_after_growth": after.get("exam"),
            "depth": stage.growth.depth, "placement": stage.growth.placement, "init": stage.growth.init,
            "optimizer": stage.growth.optimizer,
        }, indent=1))
    _atomic_save(weights, init)
    return init


# --------------------------------------------------------------------------- stage-end eval
def stage_end_eval(cfg: CurriculumConfig, run_dir: Path, s: int) -> dict | None:
    """The ``eval:`` section's scores of stage ``s``'s final model (``sdir/model.pt``), or None.

    ``exams.evaluate_run``: loss and bits per byte on every stage's held-out set, the built-in
    exams, the configured multiple-choice exams, minimal pairs and texts (also ``eval.json``).
    A baseline run is always scored, and on the curriculum's held-out sets as well, so that
    its numbers sit beside the curriculum's. None when there is nothing to do (no ``eval:``
    section, or ``every_stage: false``), which keeps a plain stage end as cheap as before.
    """
    from . import baseline as B
    from . import exams as E
    from .config import EvalConfig

    is_baseline = B.curriculum_config(run_dir) is not None
    if not is_baseline and (cfg.eval is None or not cfg.eval.every_stage):
        return None
    ev = cfg.eval or EvalConfig()
    ckpt = stage_dir(run_dir, cfg, s) / "model.pt"
    res = E.evaluate_run(ckpt, exams=ev.exams, pairs=ev.pairs, texts=ev.texts, write=False)
    if is_baseline:
        res["heldout"].update(B.comparison_eval(run_dir, ckpt))
    res["output"] = str(E.results_path(ckpt))
    E.write_results(res, res["output"])
    return E.jsonable(res)


# --------------------------------------------------------------------------- summary
def stage_result(run_dir: Path, cfg: CurriculumConfig, s: int) -> dict | None:
    f = stage_dir(run_dir, cfg, s) / "result.json"
    return json.loads(f.read_text()) if f.exists() else None


def write_summary(cfg: CurriculumConfig, run_dir: Path) -> dict:
    stages = []
    cum = 0.0
    for s, st in enumerate(cfg.stages):
        r = stage_result(run_dir, cfg, s)
        if r is None:
            stages.append({"name": st.name, "status": "pending"})
            continue
        cum += r["flops"]
        stages.append({**r, "cumulative_flops": cum, "status": "done"})
    summary = {"run": cfg.run.name, "stages": stages, "total_flops": cum}
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


__all__ = ["Plan", "effective_multipliers", "open_run_dir", "move_aside", "stage_end_eval", "load_run_config",
           "prepare_stage", "prepare_data", "stage_dir", "write_summary", "stage_result", "ensure_tokenizer",
           "stage_data", "read_exams", "RunDirError", "ConfigError"]
