"""``size-search --write``: the recommended shape put into one stage of the config, written as
``<config>.sized.yaml`` beside it (the user's file is never touched)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import ConfigError, load_config


def sized_path(config_path: Path) -> Path:
    config_path = Path(config_path)
    return config_path.with_name(config_path.stem + ".sized" + (config_path.suffix or ".yaml"))


def _find(mapping_node, key: str):
    for k, v in mapping_node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return k, v
    return None


def _line_end(text: str, index: int) -> int:
    """Where the line holding ``text[index]`` ends (the text's end on its last line)."""
    eol = text.find("\n", index)
    return len(text) if eol < 0 else eol


def _flow(values: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in values.items())


def _text_edit(text: str, stage_name: str, values: dict[str, int]) -> str | None:
    """Set the stage's model keys in the YAML *text* (comments and layout kept); None if the
    file's structure is not the plain one this edit understands."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    found = _find(root, "stages")
    if found is None or not isinstance(found[1], yaml.SequenceNode):
        return None
    stage = next((n for n in found[1].value if isinstance(n, yaml.MappingNode)
                  and (nm := _find(n, "name")) is not None and nm[1].value == stage_name), None)
    if stage is None:
        return None
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied from the end
    model = _find(stage, "model")
    if model is None:
        if stage.flow_style:
            return None
        name_key, name_val = _find(stage, "name")
        eol = _line_end(text, name_val.end_mark.index)
        edits.append((eol, eol, "\n" + " " * name_key.start_mark.column + f"model: {{{_flow(values)}}}"))
    else:
        node = model[1]
        if not isinstance(node, yaml.MappingNode):
            return None
        missing = {}
        for k, v in values.items():
            kv = _find(node, k)
            if kv is None:
                missing[k] = v
            elif isinstance(kv[1], yaml.ScalarNode):
                edits.append((kv[1].start_mark.index, kv[1].end_mark.index, str(v)))
            else:
                return None
        if missing:
            if node.flow_style:
                close = text.rfind("}", 0, node.end_mark.index)
                if close < 0:
                    return None
                lead = ", " if node.value else ""
                edits.append((close, close, lead + _flow(missing)))
            else:
                if not node.value:
                    return None
                last_key, last_val = node.value[-1]
                eol = _line_end(text, last_val.end_mark.index)
                indent = " " * last_key.start_mark.column
                edits.append((eol, eol, "".join(f"\n{indent}{k}: {v}" for k, v in missing.items())))
    for start, end, rep in sorted(edits, reverse=True):
        text = text[:start] + rep + text[end:]
    return text


def write_sized_config(config_path: Path, stage_name: str, values: dict[str, int],
                       overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, bool]:
    """Write ``<config>.sized.yaml`` beside the config with the stage's model keys set.

    Returns (path, comments_kept). Raises ConfigError (nothing written) when the result does
    not load, e.g. the new shape is larger than a later stage's (growth cannot shrink).
    """
    config_path = Path(config_path)
    text = config_path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    expected = copy.deepcopy(raw)
    st = next((x for x in expected.get("stages", []) if isinstance(x, dict) and x.get("name") == stage_name), None)
    if st is None:
        raise ConfigError(f"--write: {config_path} has no stage named {stage_name!r} in its own text")
    if not isinstance(st.get("model"), dict):
        st["model"] = {}
    st["model"].update(values)
    new = _text_edit(text, stage_name, values)
    kept = new is not None
    try:
        kept = kept and yaml.safe_load(new) == expected  # the text edit must change exactly those keys
    except yaml.YAMLError:
        kept = False
    if not kept:  # a plain re-dump: same content, comments lost
        new = yaml.safe_dump(expected, sort_keys=False, default_flow_style=False)
    target = sized_path(config_path)

    def fits(tmp: Path) -> None:  # same directory as the target: relative paths resolve the same
        try:
            load_config(tmp, overrides, check_files=False)
        except ConfigError as exc:
            raise ConfigError([f"--write: the recommended shape {values} does not fit the curriculum, "
                               f"{target} not written:"] + exc.errors) from None

    RD.write_atomic(target, new, check=fits)
    return target, kept


def check_writable(config_path: Path) -> None:
    d = Path(config_path).resolve().parent
    if not os.access(d, os.W_OK):
        raise ConfigError(f"--write: cannot write {sized_path(Path(config_path)).name} into {d} (not writable); copy "
                          "the config to a writable directory (its relative data paths must stay valid)")


__all__ = ["sized_path", "write_sized_config", "check_writable"]
