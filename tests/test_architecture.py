"""The package's layering, checked on the source: no import cycles (module- or function-level), the library core never
imports the application layer, the task registry or the CLI, the task layer never imports the application layer, and
no module grows past the size limit. docs/DESIGN.md ("Layout") draws the same rules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loradrop"
MAX_LINES = 500
CORE = {"config", "masks", "members", "precompute", "layers", "layer_types", "model", "ensemble", "generation",
        "calibration", "adalora", "adalora_layer", "dora", "quantised", "training", "prediction", "pretrained",
        "errors", "uncertainty", "conformal", "serving", "distributed", "distributed_save"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """Every loradrop module `path` imports, at any depth of the file (function-level imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "loradrop":
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "loradrop"}
    return {m for m in found if m in MODULES and m != name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: internal_imports(path) for name, path in MODULES.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in ("app", "tasks"):
        return parts[1]
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return "core" if parts[1] in CORE else "other"


def test_every_module_has_a_layer() -> None:
    assert not [m for m in MODULES if _layer(m) == "other"], "add new core modules to CORE (and to docs/DESIGN.md)"


def test_no_import_cycles() -> None:
    # the package root re-exports the core; edges into it are lazy (`from . import __version__`) and do not count
    graph = {m: {t for t in targets if t != "loradrop"} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(target):], target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("layer, forbidden", [("core", {"app", "tasks", "cli"}), ("tasks", {"app", "cli"}),
                                              ("app", {"cli"})])
def test_layers_import_only_downwards(layer: str, forbidden: set[str]) -> None:
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if _layer(m) == layer
                   for t in targets if _layer(t) in forbidden)
    assert not wrong


def test_no_module_over_the_size_limit() -> None:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    assert not {m: n for m, n in sizes.items() if n > MAX_LINES}
