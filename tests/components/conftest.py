"""One trained tiny project per test session, copied for each module that needs one."""

from __future__ import annotations

import shutil

import pytest

from components.core import config
from components.data import datasets, prepare, validate
from components.evaluation import evaluate
from components.release import export
from components.training import train
from tests.conftest import tiny_project


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory):
    """Prepared, validated, trained, evaluated and exported on TINY (its own MLflow store).
    Modules take a copy (`trained_copy`): never change this one."""
    root = tmp_path_factory.mktemp("trained-template")
    with tiny_project(root):
        cfg = config.load("params.yaml")
        datasets.run(cfg)
        prepare.run(cfg)
        assert validate.run(cfg).success
        results = {"train": train.run(cfg), "evaluation": evaluate.run(cfg)}
        results["export"] = export.run(cfg)
    return {"root": root, **results}


def trained_copy(template: dict, tmp_path_factory, name: str):
    """A fresh directory holding the template project (files and MLflow store)."""
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(template["root"], root, dirs_exist_ok=True)
    return root
