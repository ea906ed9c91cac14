"""The package's structure: layers that import only downwards, output only from the CLI, one plan per run.

The import graph is computed from the source with `ast`, counting imports inside functions too (a lazy
import is still a dependency), so a cycle cannot hide behind a function-level import. Imports under
`if TYPE_CHECKING:` are annotations only and never run, so they are not dependencies.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_doctor"

LAYERS = ("core", "recipe", "knowledge", "sources", "memory", "runplan", "smoke", "matrix", "doctor", "pins",
          "trainer", "cli")
"""Bottom to top: each part may import only the parts before it (README "Layout")."""


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The qlora_doctor modules `path` imports, at module level or inside functions."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            if len(submodules) < len(node.names) and target in known:  # a name defined in `target` itself
                targets.add(target)
            targets.update(submodules)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in known)
    targets.discard(module)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {module: _imports(path, module, known) for module, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_imports():
    graph = _graph()
    # cli/check.py imports the doctor only inside the command function
    assert "qlora_doctor.doctor.diagnose" in graph["qlora_doctor.cli.check"]


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            if _part(module) != _part(target) and "__init__" not in (_part(module), _part(target)):
                packages[_part(module)].add(_part(target))
    assert _cycle(packages) is None, dict(packages)


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_layers_below_it(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    upward = sorted(f"{module} -> {target}" for module, targets in _graph().items() if _part(module) == layer
                    for target in targets if _part(target) not in allowed and _part(target) != "__init__")
    assert not upward, upward


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for m in _modules()} - {"__init__"}
    assert parts == set(LAYERS)


def test_the_trainer_never_imports_the_doctor_or_the_planner():
    """The CLI runs the doctor and hands the report over; the memory plan comes in the RunPlan."""
    offending = sorted(f"{m} -> {t}" for m, ts in _graph().items() if _part(m) == "trainer"
                       for t in ts if _part(t) in ("doctor", "memory"))
    assert not offending, offending


OUTPUT_CALLS = {"print", "exit", "quit", "breakpoint"}
OUTPUT_ATTRIBUTES = {("sys", "exit"), ("os", "_exit"), ("click", "echo"), ("click", "secho"), ("sys", "stdout"),
                     ("sys", "stderr")}


def _output_sites(path: Path) -> list[str]:
    sites = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in OUTPUT_CALLS:
            sites.append(f"{path.name}:{node.lineno}: {node.func.id}()")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                (node.value.id, node.attr) in OUTPUT_ATTRIBUTES:
            sites.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                                                    else [])
            if any(n and n.startswith("rich") for n in names):
                sites.append(f"{path.name}:{node.lineno}: imports rich")
    return sites


def test_only_the_cli_prints_exits_or_draws():
    """Library code returns values and raises DoctorError; qlora_doctor/cli/ writes and exits. (smoke.py
    moves library chatter from stdout to stderr while its JSON goes to stdout, which is not output of its own.)"""
    found = []
    for module, path in _modules().items():
        if _part(module) == "cli":
            continue
        found += [site for site in _output_sites(path)
                  if not (module == "qlora_doctor.smoke.functional" and site.endswith("sys.stderr"))]
    assert not found, found


def test_the_output_check_sees_a_print(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sys\n\ndef f():\n    print('x')\n    sys.exit(1)\n")
    assert len(_output_sites(sample)) == 2
