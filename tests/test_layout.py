"""The repository's shape, checked from the source: top-level packages, no import cycles
(imports inside functions included), components that never import Prefect, short modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from components import config
from tests.conftest import REPO

PACKAGES = ("components", "flows", "infra", "serving")
MAX_LINES = 450
LONGER_ALLOWED = {"components/config.py"}  # the params schema: one class per section


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts): path
        for package in PACKAGES
        for path in sorted((REPO / package).glob("*.py"))
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


def test_top_level_packages_and_no_lensflow_package():
    for package in PACKAGES:
        assert (REPO / package / "__init__.py").exists()
    assert not (REPO / "lensflow").exists()
    assert len(_modules()) > 20


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_among_the_project_modules():
    assert _cycles(_graph()) == []


def test_components_never_import_prefect_or_flows():
    for name, path in _modules().items():
        if name.startswith("components."):
            roots = {imported.split(".")[0] for imported in _imports(path)}
            assert not roots & {"prefect", "flows"}, (
                f"{path} imports {roots & {'prefect', 'flows'}}"
            )


def test_serving_never_imports_flows_and_components_never_import_serving():
    for name, path in _modules().items():
        roots = {imported.split(".")[0] for imported in _imports(path)}
        if name.startswith("serving."):
            assert not roots & {"prefect", "flows"}, f"{path} imports {roots}"
        if name.startswith("components."):
            assert "serving" not in roots, f"{path} imports serving"


def test_modules_stay_short():
    too_long = {
        str(path.relative_to(REPO)): n
        for path in _modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
        and str(path.relative_to(REPO)) not in LONGER_ALLOWED
    }
    assert too_long == {}


def _stage_module(stage: str) -> str:
    return f"components.{'registry' if stage == 'register' else stage}"


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_dvc_stage_depends_on_the_code_it_runs():
    """`dvc repro` reruns a stage when any module its component imports changes."""
    graph = _graph()
    for stage, spec in _dvc_stages().items():
        imported = _imported_by(_stage_module(stage), graph)
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
        path = REPO / (_stage_module(stage).replace(".", "/") + ".py")
        if names := {
            name
            for name in _params_read(path)
            if name.split(".")[0] != "tracking"
            and name not in declared
            and name.split(".")[0] not in declared
        }:
            missing[stage] = names
    assert missing == {}, "dvc.yaml: these stages miss these params"
