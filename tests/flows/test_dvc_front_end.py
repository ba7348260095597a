"""`dvc repro` and `lensflow run` are two front ends of the same components.

In a fresh git + DVC project on tiny data: after the Prefect flow, `dvc repro` has nothing to
do; forcing it reproduces the flow's test accuracy; changing train.epochs reruns train and the
stages after it, not prepare.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from components import paths
from flows.training import training_flow
from tests.conftest import REPO, write_tiny_params


def sh(*args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_dvc_repro_matches_the_flow(project):
    shutil.copy(REPO / "dvc.yaml", project)
    for package in ("components", "flows"):  # dvc.yaml's code deps
        shutil.copytree(
            REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    write_tiny_params(project)
    sh("git", "init", "-q", cwd=project)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=project)

    summary = training_flow(params_path="params.yaml")
    assert (project / "data/raw/shapes.dvc").exists()  # the built-in data is DVC-tracked
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=project)
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=project)
    assert "Running stage" not in out

    sh(sys.executable, "-m", "dvc", "repro", "--force", cwd=project)
    reproduced = json.loads(paths.EVALUATION_REPORT.read_text())["accuracy"]
    assert reproduced == summary["test_accuracy"]

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=project)
    ran = {
        stage
        for stage in ("prepare", "validate", "train", "evaluate", "export", "register")
        if f"Running stage '{stage}'" in out
    }
    assert ran == {"train", "evaluate", "export", "register"}
    assert json.loads(paths.TRAINING_REPORT.read_text())["epochs_run"] == 5
