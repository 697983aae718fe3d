"""The package's rooms and the one-way flow between them (docs/architecture.md), read from the
imports with ``ast``: no import cycle, no import from a lower room to a higher one, the model
maths never imports the parallel adapters, no module over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmagogy_ds"
MAX_LINES = 500

# Lower layers first. A module may import its own room and any lower layer, never a higher one.
# Rooms on the same layer may not import each other.
LAYERS = [
    ("config", "fmt"),   # the config contract; text formatting
    ("model",),          # layout, the model, growth, generations, FLOPs, every stage's model
    ("rundir",),         # paths and atomic writes of a run directory
    ("data",),           # sources, tokenizer, token caches, samplers, exam items
    ("evaluation",),     # scores of a model: held-out loss, exams, bits per byte, minimal pairs
    ("interop",),        # Hugging Face export and import, lm-evaluation-harness
    ("parallel",),       # tp × pp × dp: megatron-core layers, DeepSpeed engine, rendezvous
    ("train",),          # stage trainer: loop, hooks, checkpoints, growth into a stage, stage end
    ("evidence",),       # baseline, report, size search
    ("cluster",),        # SLURM, plan, launcher
    ("cli",),            # the command line
]
FORBIDDEN = [("model", "parallel")]  # the model maths gets parallelism handed in, never imports it


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Package modules ``path`` imports (at any depth: top level or inside functions)."""
    pkg = root.name
    me = module_name(path, root)
    here = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == pkg}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != pkg:
                continue
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def graph(root: Path) -> dict[str, set[str]]:
    mods = {module_name(p, root): p for p in root.rglob("*.py")}
    edges = {}
    for name, path in mods.items():
        edges[name] = {m for m in imports_of(path, root) if m in mods and m != name}
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(r: str, layers=LAYERS) -> int | None:
    for i, rooms in enumerate(layers):
        if r in rooms:
            return i
    return None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def violations(root: Path, layers=LAYERS, forbidden=FORBIDDEN) -> list[str]:
    edges = graph(root)
    out = []
    cycle = find_cycle(edges)
    if cycle:
        out.append("import cycle: " + " -> ".join(cycle))
    for a, targets in sorted(edges.items()):
        ra = room(a)
        if ra == "__init__":
            continue
        la = layer(ra, layers)
        if la is None:
            out.append(f"{a}: room {ra!r} has no layer (declare it in LAYERS)")
            continue
        for b in sorted(targets):
            rb = room(b)
            if rb == ra or rb == "__init__":
                continue
            lb = layer(rb, layers)
            if (ra, rb) in forbidden:
                out.append(f"{a} imports {b}: the {ra} room must not import {rb}")
            elif lb is None or lb >= la:
                out.append(f"{a} imports {b}: {rb} is not below {ra}")
    return out


def long_modules(root: Path) -> list[str]:
    return [f"{p.relative_to(root.parent)}: {n} lines"
            for p in sorted(root.rglob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES]


def test_rooms_import_downward_only_and_without_cycles():
    assert violations(PACKAGE) == []


def test_no_module_over_500_lines():
    assert long_modules(PACKAGE) == []


def test_every_room_has_a_layer():
    rooms = {room(module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert sorted(r for r in rooms if layer(r) is None) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.fixture
def toy(tmp_path):
    """A synthetic package with the same rooms, clean to start with."""
    return _write(tmp_path / "toy", {
        "__init__.py": "",
        "config/__init__.py": "",
        "model/__init__.py": "",
        "model/gpt.py": "from toy.config import x\n",
        "parallel/__init__.py": "",
        "parallel/tp.py": "from toy.model.gpt import y\n",
        "train/__init__.py": "",
        "train/loop.py": "from toy.parallel import tp\nfrom toy.model import gpt\n",
    })


def test_the_check_passes_a_clean_package(toy):
    assert violations(toy) == []


def test_the_check_fails_on_a_planted_cycle(toy):
    # train.loop -> parallel.tp -> model.gpt -> train.loop (inside a function: still a cycle)
    (toy / "model" / "gpt.py").write_text("from toy.config import x\n\ndef f():\n    from toy.train import loop\n")
    found = violations(toy)
    assert any(v.startswith("import cycle:") and "toy.train.loop" in v for v in found), found
    assert any("toy.model.gpt imports toy.train.loop" in v for v in found), found


def test_the_check_fails_on_an_upward_import_and_on_model_importing_parallel(toy):
    (toy / "config" / "schema.py").write_text("from ..train import loop\n")  # relative, upward
    (toy / "model" / "ops.py").write_text("import toy.parallel.tp\n")
    found = violations(toy)
    assert "toy.config.schema imports toy.train.loop: train is not below config" in found
    assert "toy.model.ops imports toy.parallel.tp: the model room must not import parallel" in found


def test_the_check_fails_on_a_long_module(toy):
    (toy / "model" / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_modules(toy) == [f"toy/model/big.py: {MAX_LINES + 1} lines"]
