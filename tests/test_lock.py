"""requirements.lock pins the whole environment (`make setup` installs it, `make lock` remakes
it): exact versions only, and every dependency pyproject.toml names at a version it allows."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

# The platform the lock is made for (Makefile: make lock).
LOCKED_PLATFORM = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}


def _locked() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==" and not requirement.url, f"not an exact pin: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"pinned twice: {requirement.name}"
        pins[name] = Version(spec.version)
    return pins


def _direct_dependencies() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    texts = project["dependencies"] + [text for extra in extras for text in extra]
    return [Requirement(text) for text in texts]


def test_the_lock_pins_exact_versions_of_a_whole_environment():
    pins = _locked()
    assert len(pins) > 100  # the dependencies of the dependencies too
    assert {"fastapi", "sqlalchemy", "pydantic", "numpy", "starlette"} <= set(pins)


def test_the_lock_pins_every_dependency_of_pyproject_at_a_version_it_allows():
    pins = _locked()
    problems = []
    for requirement in _direct_dependencies():
        if requirement.marker and not requirement.marker.evaluate(LOCKED_PLATFORM):
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{requirement}: not in requirements.lock")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{requirement}: requirements.lock pins {pinned}")
    assert problems == [], "run `make lock`: " + "; ".join(problems)
