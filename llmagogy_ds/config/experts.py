"""``EXPERTS.yaml`` of ``llmagogy branch``: expert curricula that continue a trunk run from one of
its stages, each checked in full before anything is created::

    vars: {data: /corpora}           # optional: ${name} in values, as in a config (then the environment)
    defaults:                        # optional: merged under every expert stage (stage wins)
      train: {lr: 1.0e-3}
    experts:
      - name: arith                  # the run dir's name; run.name is <trunk run.name>-arith
        description: arithmetic facts
        run: {seed: 7}               # optional: run keys other than name and data_cache
        stages:                      # ordinary stages (data, model, train, growth, freeze, resources)
          - name: arith
            data: [{path: "${data}/arith.txt"}]
            train: {tokens: 2000000}

Each expert's config is the trunk's frozen config whose ``stages`` are the trunk's stages 0..k
(as they were trained) followed by the expert's own, with ``run.name`` = ``<trunk>-<expert>`` and
``run.data_cache`` = the trunk's cache (its sources are tokenized once). An expert stage is built
over, in this order: the trunk stage k's ``model``, ``train`` (without its budget, ``tokens`` /
``epochs``: each expert states its own) and ``resources``; this file's ``defaults``; its own keys.
So a stage without ``model`` keeps stage k's shape, and one with a larger ``model`` grows from it
(``growth``/``freeze`` as in any stage). The trunk's frozen config has its ``vars`` expanded and
its ``defaults`` merged already: give the file its own ``vars`` where it needs them. Paths are
relative to this file. Errors name the file, the expert and the key
(``experts[1] (arith): stages[0] (arith).train.tokens: ...``).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmagogy_ds.config.checks import _check_name
from llmagogy_ds.config.coerce import _check_keys, _Ctx, _deep_merge, _Errors, _field_names, _mapping
from llmagogy_ds.config.load import _defaults, config_from_dict
from llmagogy_ds.config.schema import ConfigError, CurriculumConfig, RunConfig
from llmagogy_ds.config.stages import _build_stage
from llmagogy_ds.config.variables import _substitute_vars

FILE_KEYS = ("vars", "defaults", "experts")
EXPERT_KEYS = ("name", "description", "run", "stages")
SET_BY_BRANCH = ("name", "data_cache")  # an expert's run.name and run.data_cache come from the trunk
BUDGET_KEYS = ("tokens", "epochs")  # not inherited from the trunk's stage: each expert states its own
_STAGE_LABEL = re.compile(r"\bstages\[(\d+)\]")


@dataclass
class ExpertConfig:
    name: str
    description: str
    cfg: CurriculumConfig  # trunk stages 0..k + the expert's own stages

    def own_stages(self, k: int) -> list[str]:
        return [s.name for s in self.cfg.stages[k + 1:]]


def _relabel(line: str, k: int) -> str:
    """A combined config's error line in the file's terms: ``stages[N]`` counts the expert's own
    stages (N > k), ``trunk stages[N]`` the trunk's."""
    def one(m: re.Match) -> str:
        n = int(m.group(1))
        return f"stages[{n - k - 1}]" if n > k else f"trunk stages[{n}]"

    return _STAGE_LABEL.sub(one, line)


def _inherited(trunk: CurriculumConfig, k: int) -> dict:
    """What an expert stage inherits from the trunk's stage k (module doc)."""
    stage = trunk.raw["stages"][k]
    train = {key: v for key, v in (stage.get("train") or {}).items() if key not in BUDGET_KEYS}
    return {"model": copy.deepcopy(stage.get("model") or {}), "train": train,
            "resources": copy.deepcopy(stage.get("resources") or {})}


def _expert(item, where: str, dflt: dict, trunk: CurriculumConfig, k: int, data_cache: str,
            base: Path, errs: _Errors) -> ExpertConfig | None:
    """One expert's full config, or None after adding its errors to ``errs``."""
    name = item["name"]
    sub = _Errors()
    _check_keys(item, EXPERT_KEYS, where, sub)
    _check_name(name, f"{where}.name", sub)
    run = _mapping(item.get("run"), f"{where}.run", sub) or {}
    allowed = [f for f in _field_names(RunConfig) if f not in SET_BY_BRANCH]
    for key in run:
        if key in SET_BY_BRANCH:
            sub.add(f"{where}.run.{key}", "set by branch (the run is <trunk>-<expert>, its cache the trunk's)")
    _check_keys({k_: v for k_, v in run.items() if k_ not in SET_BY_BRANCH}, allowed, f"{where}.run", sub)
    stages = item.get("stages")
    if not isinstance(stages, list) or not stages:
        sub.add(f"{where}.stages", "expected a non-empty list of stages (the expert's own curriculum)")
        stages = []
    ctx = _Ctx(base, True, sub)
    merged = []
    for j, own in enumerate(stages):
        if not isinstance(own, dict):
            sub.add(f"{where}.stages[{j}]", f"expected a mapping, got {type(own).__name__}")
            continue
        merged.append(_build_stage(k + 1 + j, own, dflt, ctx)[1])  # after stage k: growth and freeze apply
    cfg = None
    if not sub.lines:
        raw = copy.deepcopy(trunk.raw)
        raw.pop("baseline", None)  # a baseline section describes the trunk's final stage
        raw["run"] = {**raw["run"], **run, "name": f"{trunk.run.name}-{name}", "data_cache": data_cache}
        raw["stages"] = raw["stages"][: k + 1] + merged
        try:
            cfg = config_from_dict(raw, base)
        except ConfigError as e:
            for line in e.errors:
                sub.add("", line)
    for line in sub.lines:
        errs.add("", line if line.startswith(where) else f"{where}: {_relabel(line, k)}")
    return None if sub.lines else ExpertConfig(name, str(item.get("description") or ""), cfg)


def load_experts(path: Path, trunk: CurriculumConfig, k: int, data_cache: str) -> list[ExpertConfig]:
    """Every expert of ``path`` continuing ``trunk`` from its stage ``k``, checked as ``load_config``
    checks a config (growth from stage k's shape included); one ``ConfigError`` with every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: experts file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML file ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with experts (a list)")
    errs = _Errors()
    raw = _substitute_vars(raw, errs)
    _check_keys(raw, FILE_KEYS, "", errs)
    own_dflt = _defaults(raw.get("defaults"), errs)
    inherited = _inherited(trunk, k)
    dflt = {key: _deep_merge(inherited.get(key, {}), own_dflt[key]) if key in inherited else own_dflt[key]
            for key in own_dflt}
    dflt.update({key: v for key, v in inherited.items() if key not in dflt})
    items = raw.get("experts")
    if not isinstance(items, list) or not items:
        errs.add("experts", "expected a non-empty list of experts (name, stages)")
        items = []
    out: list[ExpertConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            errs.add(f"experts[{i}]", "expected a mapping with a name (a string) and stages")
            continue
        where = f"experts[{i}] ({item['name']})"
        if item["name"] in seen:
            errs.add(f"{where}.name", f"used twice (also experts[{seen[item['name']]}])")
            continue
        seen[item["name"]] = i
        e = _expert(item, where, dflt, trunk, k, data_cache, path.resolve().parent, errs)
        if e is not None:
            out.append(e)
    errs.raise_if_any(str(path))
    return out


__all__ = ["ExpertConfig", "load_experts", "FILE_KEYS", "EXPERT_KEYS"]
