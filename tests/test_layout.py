"""How the package is laid out: seqtrain's import graph (function-level imports included) has no cycle
and no arrow from a layer to one above it, and the options and run records are built by keyword."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seqtrain"

# Top to bottom. A module belongs to the layer of the longest name below that it is or starts with. An
# import may point down, or sideways within a layer that is `flat`; sideways in any other layer (one
# command importing another, one recipe another) only where SIDEWAYS names it.
LAYERS: list[tuple[str, bool, tuple[str, ...]]] = [
    ("main", False, ("seqtrain.__main__",)),  # python -m seqtrain
    ("cli", False, ("seqtrain.cli",)),
    (
        "commands",
        False,
        (
            "seqtrain.serve",
            "seqtrain.tune",
            "seqtrain.explain",
            "seqtrain.predict",
            "seqtrain.evaluate",
            "seqtrain.export",
            "seqtrain.init_config",
        ),
    ),
    ("recipes", False, ("seqtrain.train", "seqtrain.pretrain", "seqtrain.vectors")),
    ("pipeline", False, ("seqtrain.training", "seqtrain.inference")),
    (
        "library",
        True,
        (
            "seqtrain.data",
            "seqtrain.model",
            "seqtrain.checkpoint",
            "seqtrain.config",
            "seqtrain.encoding",
            "seqtrain.losses",
            "seqtrain.metrics",
            "seqtrain.optim",
            "seqtrain.runtime",
            "seqtrain.devices",
            "seqtrain.report",
            "seqtrain.plots",
            "seqtrain.badrows",
            "seqtrain.machine",
        ),
    ),
    ("base", True, ("seqtrain.console", "seqtrain.errors", "seqtrain")),
]
SIDEWAYS = {
    ("seqtrain.serve", "seqtrain.explain"): "POST /explain runs explain's occlusion",
    ("seqtrain.evaluate", "seqtrain.explain"): "eval --report lists explain's top words",
    ("seqtrain.pretrain", "seqtrain.vectors"): "pretrain.objective: vectors runs vectors.train_vectors",
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The seqtrain modules `source` imports anywhere in it (in functions too, and under TYPE_CHECKING):
    `from seqtrain import console` is seqtrain.console, `from seqtrain import __version__` is seqtrain."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in (or is)
                package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    return {name for name in found if name in modules and name != module}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {
        name: imports_of(path.read_text(), name, path.name == "__init__.py", set(files))
        for name, path in files.items()
    }


def place(module: str) -> tuple[int, bool, str] | None:
    """(layer index, flat, component) of a module: the longest name in LAYERS it is or lies under."""
    best: tuple[int, bool, str] | None = None
    for index, (_, flat, names) in enumerate(LAYERS):
        for name in names:
            inside = module == name or (name != "seqtrain" and module.startswith(name + "."))
            if inside and (best is None or len(name) > len(best[2])):
                best = (index, flat, name)
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """What breaks the layering: a module in no layer, an upward import, an unlisted sideways import
    between components of a layer that is not flat, a cycle."""
    problems = [f"{m} is in no layer of tests/test_layout.py's LAYERS" for m in sorted(graph) if not place(m)]
    for src in sorted(graph):
        here = place(src)
        for dst in sorted(graph[src]):
            there = place(dst)
            if here is None or there is None:
                continue
            (i, flat, component), (j, _, target) = here, there
            if j < i:
                problems.append(f"{src} imports {dst}: up from {LAYERS[i][0]} to {LAYERS[j][0]}")
            elif j == i and not flat and component != target and (component, target) not in SIDEWAYS:
                problems.append(f"{src} imports {dst}: sideways within {LAYERS[i][0]}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def test_the_import_graph_points_down_and_has_no_cycles() -> None:
    graph = import_graph()
    assert "seqtrain.inference.target" in graph and graph["seqtrain.cli"], "the graph was not read"
    assert violations(graph) == []


def test_the_check_finds_what_breaks_the_layering() -> None:
    graph = import_graph()
    up, loop = violations({**graph, "seqtrain.errors": {"seqtrain.cli"}})  # the cli imports errors
    assert up == "seqtrain.errors imports seqtrain.cli: up from base to cli"
    assert loop.startswith("import cycle:") and {"seqtrain.cli", "seqtrain.errors"} <= set(
        loop[14:].split(" -> ")
    )
    upward = {**graph, "seqtrain.runtime": graph["seqtrain.runtime"] | {"seqtrain.inference.run"}}
    assert "seqtrain.runtime imports seqtrain.inference.run: up from library to pipeline" in violations(
        upward
    )
    recipe = {**graph, "seqtrain.train": graph["seqtrain.train"] | {"seqtrain.pretrain"}}
    assert violations(recipe) == ["seqtrain.train imports seqtrain.pretrain: sideways within recipes"]
    sideways = {**graph, "seqtrain.config": graph["seqtrain.config"] | {"seqtrain.data"}}  # a flat layer
    assert violations(sideways) == ["import cycle: seqtrain.config -> seqtrain.data -> seqtrain.encoding"]
    assert violations({**graph, "seqtrain.newmodule": set()}) == [
        "seqtrain.newmodule is in no layer of tests/test_layout.py's LAYERS"
    ]


def test_imports_inside_functions_and_from_the_package_are_read() -> None:
    modules = {"seqtrain", "seqtrain.console", "seqtrain.data", "seqtrain.serve", "seqtrain.serve.app"}
    source = (
        "from seqtrain import __version__, console\n"
        "def f():\n"
        "    import seqtrain.data\n"
        "    from . import app\n"
    )
    assert imports_of(source, "seqtrain.serve.batcher", False, modules) == {
        "seqtrain",
        "seqtrain.console",
        "seqtrain.data",
        "seqtrain.serve",
        "seqtrain.serve.app",
    }


@pytest.mark.parametrize(
    "record",
    [
        "seqtrain.serve.options:ServeOptions",
        "seqtrain.tune.options:Options",
        "seqtrain.inference.run:Run",
        "seqtrain.inference.onnx:ExportedRun",
        "seqtrain.train:ClassifierRun",
        "seqtrain.pretrain:LMRun",
        "seqtrain.checkpoint:TrainState",
        *(f"seqtrain.config:{name}" for name in ("Config", "DataConfig", "TokenizerConfig", "ModelConfig")),
        *(f"seqtrain.config:{name}" for name in ("TrainConfig", "PretrainConfig")),
    ],
)
def test_options_and_run_records_are_built_by_keyword(record: str) -> None:
    import importlib

    module, _, name = record.partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert all(f.kw_only for f in dataclasses.fields(cls)), f"{record} takes positional fields"
