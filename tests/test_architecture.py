"""The layout's rules, read from the source with ``ast``: every import counts (module level, inside
``if TYPE_CHECKING:`` and inside function bodies), no import cycle among the project's modules,
allocators knows nothing of the layers above it, and only the packages are installed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib
from setuptools import find_namespace_packages, find_packages

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("allocators", "optim_cpu", "profilers", "offload", "plots", "experiments")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
    if "results" not in path.relative_to(ROOT).parts
}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str) -> set[str]:
    """The project modules ``module`` imports anywhere in its source: ``from pkg import name``
    counts as an import of ``pkg.name`` when that is a module, else of ``pkg`` itself."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it (the first repeated at the end), or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()}) is None
    True
    """
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_the_import_graph_sees_type_checking_and_function_body_imports():
    # host_groups imports ActivationEstimate under `if TYPE_CHECKING:` only, and the rate
    # model imports profilers inside load_rates: both must reach the graph for the checks to hold.
    assert "offload.planning.activation_bytes" in GRAPH["offload.planning.host_groups"]
    assert "profilers.machine_profile" in GRAPH["offload.planning.simulator.rates"]


def test_there_is_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


@pytest.mark.parametrize(
    ("layer", "must_not_import"),
    [
        ("allocators", ("offload", "optim_cpu", "profilers", "plots", "experiments")),
        ("optim_cpu", ("offload", "profilers", "plots", "experiments")),
        ("profilers", ("offload", "plots", "experiments")),
        # offload may draw with plots (`offload report --plot`), never run experiments.
        ("offload", ("experiments",)),
        ("plots", ("experiments",)),
    ],
)
def test_each_layer_imports_only_the_layers_below_it(layer, must_not_import):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] == layer
        for target in targets
        if target.split(".")[0] in must_not_import
    )
    assert not wrong, wrong


def test_allocators_imports_no_offload_module():
    offenders = {
        m: sorted(t for t in GRAPH[m] if t.startswith("offload"))
        for m in GRAPH
        if m.startswith("allocators")
    }
    assert not any(offenders.values()), offenders


def test_exactly_the_packages_are_installed(tmp_path):
    # setuptools' own discovery, as pyproject.toml configures it (namespaces default to true).
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    settings = find["packages"]["find"]
    discover = find_namespace_packages if settings.get("namespaces", True) else find_packages
    installed = {name.split(".")[0] for name in discover(str(ROOT), include=settings["include"])}
    assert installed == {"allocators", "optim_cpu", "profilers", "offload", "plots"}
    # The folders `offload demo` writes beside the code (CSV, JSON) are never a package.
    (tmp_path / "offload").mkdir()
    (tmp_path / "offload" / "__init__.py").touch()
    (tmp_path / "offload-profile-host").mkdir()
    (tmp_path / "offload-profile-host" / "profile.json").touch()
    assert discover(str(tmp_path), include=settings["include"]) == ["offload"]
