"""``${name}`` / ``${name:-default}`` substitution from ``vars:`` and the environment."""

import os
import re
from collections.abc import Mapping
from typing import Any

from llmagogy_ds.config.coerce import _Errors, _join, _mapping
from llmagogy_ds.config.stages import _stage_label

_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `${name}` or `${name:-default}` (the default runs to the first closing brace)
_VAR_REF_RE = re.compile(r"\$\{([^}]*?)(?::-([^}]*))?\}")


def _substitute_vars(raw: dict[str, Any], errs: _Errors) -> dict[str, Any]:
    """Expand ``${name}`` and ``${name:-default}`` in every string value (keys are left alone).

    ``name`` is looked up in the top-level ``vars`` mapping (after ``--set``, so
    ``--set vars.corpus_root=/data`` works; a var may use other vars), then in the environment,
    then the default. An undefined name is an error naming it and the key that uses it. The
    result has no ``vars`` key: a run's frozen config keeps the expanded values, so resuming
    does not depend on the environment of the day.
    """
    raw = dict(raw)
    table = _mapping(raw.pop("vars", None), "vars", errs) or {}
    bad: set[str] = set()
    for name, value in table.items():
        if not isinstance(name, str) or not _VAR_NAME_RE.fullmatch(name):
            errs.add(f"vars.{name}", "a variable name must match [A-Za-z_][A-Za-z0-9_]*")
            bad.add(str(name))
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errs.add(f"vars.{name}", f"must be a string or a number, got {type(value).__name__} {value!r}")
            bad.add(name)
    done: dict[str, str | None] = {}

    def lookup(name: str, default: str | None, where: str, chain: tuple[str, ...]) -> str | None:
        if name in table:
            if name in bad:
                return None  # already reported at vars.<name>
            if name in chain:
                errs.add(f"vars.{name}", "circular reference: " + " -> ".join((*chain, name)))
                return None
            if name not in done:
                done[name] = expand(str(table[name]), f"vars.{name}", (*chain, name))
            return done[name]
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        errs.add(where, f"undefined variable ${{{name}}}: define it under vars (or --set vars.{name}=VALUE), "
                        f"or set the environment variable {name}")
        return None

    def expand(text: str, where: str, chain: tuple[str, ...]) -> str | None:
        ok = True

        def one(m: re.Match) -> str:
            nonlocal ok
            name, default = m.group(1), m.group(2)
            value = None
            if not _VAR_NAME_RE.fullmatch(name):
                errs.add(where, f"bad variable reference {m.group(0)!r} (expected ${{name}} or ${{name:-default}})")
            else:
                value = lookup(name, default, where, chain)
            ok = ok and value is not None
            return m.group(0) if value is None else value

        out = _VAR_REF_RE.sub(one, text)
        if "${" in _VAR_REF_RE.sub("", text):
            errs.add(where, f"unterminated variable reference in {text!r} (missing '}}')")
            ok = False
        return out if ok else None

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, str):
            if "${" not in node:
                return node
            out = expand(node, path, ())
            return node if out is None else out
        if isinstance(node, Mapping):
            return {k: walk(v, _join(path, k)) for k, v in node.items()}
        if isinstance(node, list):
            label = _stage_label if path == "stages" else (lambda i, _v: f"{path}[{i}]")
            return [walk(v, label(i, v)) for i, v in enumerate(node)]
        return node

    return walk(raw, "")
