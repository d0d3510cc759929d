"""The package's shape: no import cycles, one version, one step registry that specs are checked against."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "prenorm_convert"


def _imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """Modules of the package that ``tree`` imports, at any depth (function-level imports count):
    ``from .x import`` / ``from prenorm_convert.x import`` -> x; ``from . import name`` -> name
    when it is a module, else the package ``__init__`` (e.g. ``from . import __version__``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
            elif node.level == 0 and (node.module or "").split(".")[0] == "prenorm_convert":
                base = node.module.partition(".")[2]
            else:
                continue
            if base:
                found.add(base.split(".")[0])
            else:
                found |= {alias.name if alias.name in modules else "__init__" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("prenorm_convert.")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    return {
        name: _imported_modules(ast.parse((PACKAGE / f"{name}.py").read_text()), modules) - {name}
        for name in sorted(modules)
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name)
    return cycles


def test_no_import_cycles():
    graph = import_graph()
    assert {"plan", "conversion", "verification", "transform"} <= set(graph)  # the parse found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)
    upward = sorted(name for name, targets in graph.items() if "__init__" in targets)
    assert not upward, f"modules importing the package __init__: {upward}"


def test_the_version_is_declared_once_per_file_and_they_agree():
    from prenorm_convert import __version__
    from prenorm_convert._version import __version__ as version

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert __version__ == version == pyproject["project"]["version"]


def test_inspect_words_and_row_rules_come_from_the_step_registry():
    from prenorm_convert import transform

    assert all(entry.name == name and entry.fn.__name__ == name for name, entry in transform.STEPS.items())
    assert transform.STEPS["identity"].words is None  # inspect lists changes only
    assert all(transform.STEPS[name].words for name in transform.STEPS if name != "identity")
    assert transform.stem_hooks() == ("bake_layernorm",)


def test_an_unknown_stem_hook_is_refused_when_the_spec_loads():
    from prenorm_convert.errors import SpecError
    from prenorm_convert.spec_loader import parse_spec

    data = yaml.safe_load((PACKAGE / "configs" / "bloom.yaml").read_text())
    assert data["stem_norms"], "bloom has a stem norm"
    parse_spec(data, "configs/bloom.yaml")
    data["stem_norms"][0]["hook"] = "bake_layernrom"
    with pytest.raises(SpecError, match=r"configs/bloom\.yaml.*'bake_layernrom'"):
        parse_spec(data, "configs/bloom.yaml")
