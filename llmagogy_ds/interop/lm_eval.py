"""lm-evaluation-harness on a stage's model: exported as a Hugging Face LLaMA (``export.py``),
scored by ``lm_eval.simple_evaluate(model="hf", ...)``, stored beside our scores in ``eval.json``
under ``lm_eval``.

Tasks are lm-eval's own names (``arc_easy``, ``hellaswag``: they need their data sets, so the
hub or a local datasets cache), a task YAML file or directory (added to lm-eval's include
path), or one of our multiple-choice JSONL files, which ``mc_task`` turns into a local task.

Same items, same numbers: our ``score_multiple_choice`` conditions on ``<|endoftext|>`` +
question and scores ``" " + choice``; the exported tokenizer puts ``<|endoftext|>`` in front of
every encoding and ``mc_task`` uses ``target_delimiter: " "``, so lm-eval scores the same tokens
and its ``acc`` / ``acc_norm`` (log-likelihood / characters of the choice) equal our ``acc`` /
``acc_norm``. They differ only for items whose question ends with whitespace or whose choice
starts with it (we add no space there; lm-eval always puts the delimiter in).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llmagogy_ds import rundir as RD
from llmagogy_ds.data.items import load_jsonl
from llmagogy_ds.evaluation.results import locate_checkpoint, results_path
from llmagogy_ds.interop.export import HF_DIR, export_stage

def mc_task(jsonl, out_dir, name: str | None = None) -> str:
    """Write an lm-eval task over our multiple-choice items (``{"question", "choices",
    "answer"}``) into ``out_dir`` (its YAML and a copy of the items); returns the task name."""
    items = load_jsonl(jsonl, kind="exam")
    name = name or "llmagogy_" + "".join(c if c.isalnum() else "_" for c in Path(jsonl).stem)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    # only the fields the task reads: extra ones (grade, subject) of mixed types break Arrow
    data.write_text("".join(json.dumps({"question": it["question"], "choices": [str(c) for c in it["choices"]],
                                        "answer": int(it["answer"])}) + "\n" for it in items))
    (out / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "metadata: {version: 1.0}\n")
    return name


def resolve_tasks(tasks, work_dir) -> tuple[list[str], list[str]]:
    """``(task names, include paths)`` of ``tasks`` (names, YAML files or dirs, our JSONL exams;
    a comma-separated string or a list)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    names, include = [], []
    for t in (x.strip() for entry in tasks for x in str(entry).split(",")):
        if not t:
            continue
        p = Path(t)
        if p.suffix == ".jsonl" and p.is_file():
            include.append(str(Path(work_dir)))
            names.append(mc_task(p, work_dir))
        elif p.suffix in (".yaml", ".yml") and p.is_file():
            include.append(str(p.resolve().parent))
            names.append(_yaml_task_name(p))
        elif p.is_dir():
            raise ValueError(f"--lm-eval {t}: a directory; name its tasks (TASK,...) and pass the YAML files")
        else:
            names.append(t)
    return names, sorted(set(include))


def _yaml_task_name(p: Path) -> str:
    for line in p.read_text().splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise ValueError(f"{p}: no 'task:' line")


def run_lm_eval(hf_dir, tasks: list[str], include: list[str] = (), num_fewshot: int | None = None,
                device: str = "cpu", batch_size: int = 8, limit: int | None = None, samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` with ``model="hf"`` on an exported model dir, offline; returns
    per task its metrics (``results``), the shots, the lm-eval version and the settings, and
    with ``samples`` every document's log-likelihoods (``samples``: ``{task: [[ll, ...], ...]}``)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError(f"--lm-eval needs lm-evaluation-harness ({e}): pip install -e '.[hf]'") from None
    tm = TaskManager(include_path=list(include) or None)
    missing = [t for t in tasks if not tm.match_tasks([t])]
    if missing:
        raise ValueError(f"lm-eval: unknown task(s) {', '.join(missing)} (lm-eval's names, task YAML files, "
                         "or multiple-choice JSONL files)")
    # the model is a local directory (no hub call); a named task's data set comes from the hub or
    # the datasets cache (HF_DATASETS_OFFLINE=1 on a machine without network)
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"},
        tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
        task_manager=tm, log_samples=samples)
    return RD.jsonable({
        "tasks": tasks, "num_fewshot": num_fewshot, "device": device, "limit": limit,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "results": {t: {k: v for k, v in r.items() if k != "alias"} for t, r in out["results"].items()},
        "n_shot": out.get("n-shot"), "n_samples": out.get("n-samples"),
        **({"samples": {t: [[float(r[0]) for r in d["filtered_resps"]] for d in sorted(docs, key=lambda d: d["doc_id"])]
                        for t, docs in out["samples"].items()}} if samples else {}),
    })


def evaluate_path(path, tasks, num_fewshot: int | None = None, device: str = "cpu", dtype: str = "fp32",
                  limit: int | None = None, write: bool = True) -> dict:
    """lm-eval on a run dir (last finished stage), a stage dir or its weights: the stage's
    ``hf/`` export when the ``export:`` section wrote one, else a fresh export in a temporary
    dir; the result goes into ``eval.json`` beside the checkpoint under ``lm_eval``."""
    ckpt, run_dir, s = locate_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="llmagogy-lm-eval-") as tmp:
        names, include = resolve_tasks(tasks, Path(tmp) / "tasks")
        hf_dir = ckpt.parent / HF_DIR
        if not (hf_dir / "config.json").exists() or dtype != "fp32":
            hf_dir = export_stage(run_dir, s, Path(tmp) / "hf", dtype)
        res = run_lm_eval(hf_dir, names, include, num_fewshot, device, limit=limit)
    res["model"] = str(ckpt)
    if write:
        out = results_path(ckpt)
        merged = RD.read_json(out) or {"checkpoint": str(ckpt)}
        merged["lm_eval"] = res
        RD.write_atomic(out, merged)
    return res


def format_lm_eval(res: dict) -> str:
    """A plain-text table of ``run_lm_eval``'s results (every numeric metric per task)."""
    from llmagogy_ds.fmt import text_table

    rows = []
    for task, metrics in res["results"].items():
        for k, v in metrics.items():
            if "," in k and "stderr" not in k and isinstance(v, (int, float)):  # "metric,filter" keys
                rows.append([task, k.split(",")[0], f"{v:.4f}"])
    shots = "default" if res.get("num_fewshot") is None else res["num_fewshot"]
    return text_table(f"lm-evaluation-harness ({shots}-shot)", ["task", "metric", "value"], rows)


__all__ = ["mc_task", "resolve_tasks", "run_lm_eval", "evaluate_path", "format_lm_eval"]
