"""``--set key.path=value`` overrides, applied to the raw YAML before anything is checked."""

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from llmagogy_ds.config.coerce import _Errors, _normalize_freeze, _to_number


def _parse_override_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # e.g. `run.name=a: b` -- take it literally
    return _to_number(value) if isinstance(value, str) else value


def _find_stage(stages: list[Any], rest: str) -> tuple[int, str] | None:
    """Match ``NAME.key...`` (names may contain dots: longest match wins) or ``INDEX.key...``."""
    best: tuple[int, str] | None = None
    for idx, stage in enumerate(stages):
        name = stage.get("name") if isinstance(stage, Mapping) else None
        if isinstance(name, str) and (rest == name or rest.startswith(name + ".")):
            if best is None or len(name) > len(best[1]):
                best = (idx, name)
    if best is not None:
        return best[0], rest[len(best[1]) + 1 :]
    head, _, tail = rest.partition(".")
    if head.isdigit() and int(head) < len(stages):
        return int(head), tail
    return None


def _set_override(root: dict[str, Any], key: str, value: Any) -> None:
    node: Any = root
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        stages = root.get("stages")
        if not isinstance(stages, list):
            raise ValueError("the config has no stages list")
        found = _find_stage(stages, key[len("stages.") :])
        if found is None:
            names = [s.get("name") for s in stages if isinstance(s, Mapping)]
            raise ValueError(f"no stage named {parts[1]!r} (stages: {', '.join(map(str, names))})")
        idx, rest = found
        if not rest:
            raise ValueError("must name a key inside the stage, e.g. stages.NAME.train.lr")
        node, parts = stages[idx], rest.split(".")
    if any(not p for p in parts):
        raise ValueError("empty key segment")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ValueError(f"{part!r} is not an index of a list of {len(node)}")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ValueError(f"cannot set a key under a {type(node).__name__} value")
        if node.get(part) is None:
            node[part] = {}  # create intermediate mappings
        elif part == "freeze":
            node[part] = _normalize_freeze(node[part])  # `freeze: 0.5` then `freeze.auto=true`
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ValueError(f"{last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"cannot set a key under a {type(node).__name__} value")


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.path=value`` overrides applied (values parsed as YAML).

    ``stages.NAME.…`` (or ``stages.INDEX.…``) addresses one stage; ``defaults.…`` reaches every
    stage that does not set the key itself.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(dict(raw))
    errs = _Errors()
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            errs.add(f"override {override!r}", "expected the form key.path=value")
            continue
        try:
            _set_override(out, key, _parse_override_value(text.strip()))
        except ValueError as exc:
            errs.add(f"override {override!r}", str(exc))
    errs.raise_if_any()
    return out
