"""The package's dependency rules, read from the code's own imports (every ``import``, also inside functions).

Layers, lowest first: the runtime shipped into checkpoints; the base (graph, sources, calibration,
evaluation, report, I/O helpers); the passes and the exporters beside each other; the pipeline; the
conversion; the CLI. A module imports only its own layer or lower ones, the passes and the exporters never
see each other, and no two modules import each other, even through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("converter", "passes", "exporters")
ALLOWED = {  # layer -> the layers its modules may import
    "runtime": {"runtime"},
    "base": {"base", "runtime"},
    "passes": {"passes", "base", "runtime"},
    "exporters": {"exporters", "base", "runtime"},
    "pipeline": {"pipeline", "passes", "base", "runtime"},
    "conversion": {"conversion", "pipeline", "passes", "exporters", "base", "runtime"},
    "cli": {"cli", "conversion", "pipeline", "passes", "exporters", "base", "runtime"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[:3] == ["slimformer", "converter", "runtime"]:
        return "runtime"
    if len(parts) > 1 and parts[1] in ("passes", "exporters"):
        return parts[1]
    name = parts[2] if len(parts) > 2 else ""
    return name if name in ("pipeline", "conversion", "cli") else "base"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(["slimformer", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = module_name(path)
            here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            targets = graph.setdefault(name, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                    target = ".".join(base + ([node.module] if node.module else []))
                    names = [f"{target}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    target, names = "", [a.name for a in node.names]
                else:
                    continue
                for candidate in [target, *names]:
                    if candidate.startswith("slimformer."):
                        targets.add(candidate)
    modules = set(graph)
    # "from .runtime import kv_cache" names a module; "from .graph import load_graph" names its module.
    return {
        m: {t if t in modules else t.rsplit(".", 1)[0] for t in ts} & modules - {m} for m, ts in graph.items()
    }


def test_every_import_points_down() -> None:
    wrong = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_shipped_runtime_imports_only_itself() -> None:
    """Checkpoints carry the runtime files flat beside config.json: one slimformer import would break them."""
    for module, targets in import_graph().items():
        if layer(module) == "runtime":
            assert all(layer(t) == "runtime" for t in targets), (module, targets)
