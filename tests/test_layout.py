"""The repository's shape, checked from the source: top-level packages, components grouped by
concern in a declared order (components.ORDER), no import cycles among modules or packages
(imports inside functions included), components that never import Prefect, short modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

import components
from cli.pipeline import DETECTION_STAGES, STAGES
from components.core import config
from tests.conftest import REPO

PACKAGES = ("cli", "components", "flows", "infra", "serving")
MAX_LINES = 450
MAX_MODULES_PER_PACKAGE = 12


def _modules() -> dict[str, Path]:
    """Every module of the code packages, sub-packages included (`__init__.py` files aside)."""
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "__init__.py"
    }


def _imports(path: Path) -> set[str]:
    """Every module name this file imports, anywhere in it (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _imported_by(module: str, graph: dict[str, set[str]]) -> set[str]:
    """`module` and every project module it imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def _package(module: str) -> str:
    """The package a module belongs to, for the layering: `components.<sub-package>` for a
    component, `components` for preflight, else the top-level package (`cli`, `flows`, …)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "components" and len(parts) > 2 else parts[0]


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        own = _package(module)
        packages.setdefault(own, set()).update(_package(name) for name in imported)
    for own, imported in packages.items():
        imported.discard(own)
        for name in imported:
            packages.setdefault(name, set())
    return packages


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a imports b` for each component importing a sub-package later than its own in
    components.ORDER (preflight, checking across them, may import all)."""
    rank = {f"components.{name}": i for i, name in enumerate(components.ORDER)}
    found = []
    for module, imported in sorted(graph.items()):
        own = _package(module)
        if own in rank:
            found += [
                f"{module} imports {name}"
                for name in sorted(imported)
                if rank.get(_package(name), -1) > rank[own]
            ]
    return found


def test_top_level_packages_and_no_lensflow_package():
    for package in PACKAGES:
        assert (REPO / package / "__init__.py").exists()
    assert not (REPO / "lensflow").exists()
    assert len(_modules()) > 20


def test_components_are_grouped_into_the_declared_sub_packages():
    loose = {p.name for p in (REPO / "components").glob("*.py")} - {"__init__.py", "preflight.py"}
    assert loose == set(), "every component belongs to a sub-package of components.ORDER"
    found = {p.parent.name for p in (REPO / "components").glob("*/__init__.py")}
    assert found == set(components.ORDER)


def test_sub_packages_are_small_documented_and_re_export_nothing():
    for name in components.ORDER:
        package = REPO / "components" / name
        modules = [p for p in package.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_MODULES_PER_PACKAGE, f"components/{name}: {len(modules)} modules"
        init = ast.parse((package / "__init__.py").read_text())
        assert ast.get_docstring(init), f"components/{name}/__init__.py: say what it holds"
        assert [type(node).__name__ for node in init.body] == ["Expr"], (
            f"components/{name}/__init__.py holds more than its docstring"
        )


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_among_the_project_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycle_among_the_packages():
    assert _cycles(_package_graph(_graph())) == []


def test_no_component_imports_a_sub_package_above_its_own():
    assert _upward_imports(_graph()) == []


def test_a_planted_upward_import_is_caught():
    """The positive control: core reaching up into release breaks both layering checks."""
    graph = _graph()
    graph["components.core.paths"] = graph["components.core.paths"] | {
        "components.release.registry"
    }
    assert _upward_imports(graph) == ["components.core.paths imports components.release.registry"]
    assert _cycles(_package_graph(graph)) != []


def test_components_never_import_prefect_flows_cli_or_serving():
    for name, path in _modules().items():
        if name.startswith("components."):
            roots = {imported.split(".")[0] for imported in _imports(path)}
            banned = roots & {"prefect", "flows", "cli", "serving"}
            assert not banned, f"{path} imports {banned}"


def test_flows_and_serving_never_import_the_cli():
    for name, path in _modules().items():
        roots = {imported.split(".")[0] for imported in _imports(path)}
        if name.startswith("serving."):
            assert not roots & {"prefect", "flows", "cli"}, f"{path} imports {roots}"
        if name.startswith("flows."):
            assert "cli" not in roots, f"{path} imports cli"


def test_modules_stay_short():
    too_long = {
        str(path.relative_to(REPO)): n
        for path in _modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert too_long == {}


def test_tests_mirror_the_packages():
    for folder in (REPO / "tests").rglob("*"):
        if folder.is_dir() and (folder / "__init__.py").exists() and folder.name != "tests":
            code = REPO / folder.relative_to(REPO / "tests")
            assert (code / "__init__.py").exists(), f"{folder}: no package {code} to mirror"


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_dvc_stage_runs_a_component_of_the_stage_table():
    assert set(_dvc_stages()) == set(STAGES)
    for stage, spec in _dvc_stages().items():
        assert spec["cmd"] == f"lensflow stage {stage}"


def test_every_dvc_stage_depends_on_the_code_it_runs():
    """`dvc repro` reruns a stage when any module its component imports changes."""
    graph = _graph()
    for stage, spec in _dvc_stages().items():
        imported = _imported_by(STAGES[stage], graph)
        if stage in DETECTION_STAGES:  # the same stage under task: detection
            imported |= _imported_by(DETECTION_STAGES[stage], graph)
        code = {name.replace(".", "/") + ".py" for name in imported}
        assert code - set(spec["deps"]) == set(), f"dvc.yaml: stage {stage} misses these deps"


def _params_read(path: Path) -> set[str]:
    """`section.key` for every `cfg.section.key` in a module; `section` where it reads a
    section whole (`cfg.seed`, `cfg.train` passed on)."""
    fields = {name: info.alias or name for name, info in config.Config.model_fields.items()}
    read = set()
    for section, key in re.findall(r"\bcfg\.(\w+)(?:\.(\w+))?", path.read_text()):
        if section in fields:
            read.add(f"{fields[section]}.{key}" if key else fields[section])
    return read


def test_every_dvc_stage_depends_on_the_params_its_component_reads():
    """`dvc repro` reruns a stage when a param its own module reads changes. `tracking` only
    says where MLflow logs go."""
    missing = {}
    for stage, spec in _dvc_stages().items():
        declared = set(spec.get("params", []))
        modules = [STAGES[stage], *([DETECTION_STAGES[stage]] if stage in DETECTION_STAGES else [])]
        read = set().union(*(_params_read(REPO / (m.replace(".", "/") + ".py")) for m in modules))
        if names := {
            name
            for name in read
            if name.split(".")[0] != "tracking"
            and name not in declared
            and name.split(".")[0] not in declared
        }:
            missing[stage] = names
    assert missing == {}, "dvc.yaml: these stages miss these params"
