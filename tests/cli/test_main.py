"""The `lensflow` command as a user runs it: exit codes, one-line errors, fast --help."""

import json
import subprocess
import sys
import time

import pytest

from components.data import datasets
from tests.conftest import write_tiny_params


def lensflow(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_imports_no_heavy_library():
    code = (
        "import sys\nfrom cli.main import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'mlflow', 'prefect', 'great_expectations', 'dvc') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]")


def test_mistyped_key_is_one_line_exit_2(project):
    (project / "params.yaml").write_text("train:\n  epoch: 3\n")
    done = lensflow("run", cwd=project)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epoch" in lines[0] and "epochs" in lines[0]


def test_bad_set_override_is_exit_2(project):
    done = lensflow("stage", "prepare", "--set", "prepare.image_size=huge", cwd=project)
    assert done.returncode == 2 and "prepare.image_size" in done.stderr


def test_validate_any_folder_exit_codes(project):
    root = project / "imgs"
    datasets.write("shapes", root, per_class=4, seed=0)
    ok = lensflow("validate", str(root), "--report", "out/report.json", cwd=project)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((project / "out/report.json").read_text())["success"]
    assert not (project / "data").exists()  # the project's own data is untouched

    (root / "gradient_h" / "notes.png").write_text("not an image")
    bad = lensflow("validate", str(root), "--report", "out/report.json", cwd=project)
    assert bad.returncode == 1
    assert "validation FAILED" in bad.stdout and "not_an_image 1" in bad.stdout
    issues = json.loads((project / "out/report.json").read_text())["issues"]
    assert issues[0] == {
        "path": "gradient_h/notes.png",
        "code": "not_an_image",
        "severity": "error",
        "message": issues[0]["message"],
    }
    assert [i for i in issues if i["severity"] == "error"] == issues[:1]
    assert (project / "out/report.html").exists()


@pytest.mark.parametrize("target", ["missing", "a_file", "no_class_folders"])
def test_validate_unusable_input_is_exit_2(project, target):
    (project / "a_file").write_text("x")
    (project / "no_class_folders").mkdir()
    (project / "no_class_folders" / "stray.png").write_text("x")
    done = lensflow("validate", target, cwd=project)
    assert done.returncode == 2 and target in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_training_on_data_prepared_after_its_validation_is_exit_1(project):
    write_tiny_params(project)
    datasets.write("shapes", project / "first", per_class=4, seed=0)
    datasets.write("shapes", project / "second", per_class=4, seed=1)
    for stage in ("prepare", "validate"):
        done = lensflow("stage", stage, "--set", "data.source=first", cwd=project)
        assert done.returncode == 0, done.stderr
    lensflow("stage", "prepare", "--set", "data.source=second", cwd=project)
    done = lensflow("stage", "train", "--set", "data.source=second", cwd=project)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "lensflow stage validate" in done.stderr.strip().splitlines()[-1]


PREFLIGHT_MISTAKES = {
    "missing folder": (["data.source=/nonexistent"], "data.source /nonexistent: folder not found"),
    "no class folders": (["data.source=photos/china"], "no class folders"),
    "too small for the arch": (
        ["data.source=photos", "model.arch=efficientnet_lite0"],
        "prepare.image_size is 16 px but model.arch efficientnet_lite0 needs at least 32",
    ),
    "input size too small": (
        ["data.source=photos", "model.pretrained=efficientnet-lite0", "model.input_size=16"],
        "model.input_size is 16 px",
    ),
    "weights of another arch": (
        ["data.source=photos", "model.pretrained=efficientnet-lite0", "model.arch=resnet18"],
        "set model.arch=efficientnet_lite0",
    ),
    "missing weights file": (["data.source=photos", "model.pretrained=w.pt"], "w.pt: file not"),
    "no tuned params": (["data.source=photos", "train.use_tuned=true"], "train.use_tuned"),
}


@pytest.mark.parametrize("mistake", PREFLIGHT_MISTAKES)
def test_preflight_mistakes_cost_one_line_and_no_prefect_server(project, photographs, mistake):
    overrides, message = PREFLIGHT_MISTAKES[mistake]
    started = time.perf_counter()
    done = lensflow("run", *[a for o in overrides for a in ("--set", o)], cwd=project)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensflow: error: ") and message in lines[0]
    assert seconds < 5, f"{seconds:.1f} s"  # no Prefect server (~10 s), no torch


def test_preflight_runs_before_every_command_that_trains(project, photographs):
    bad = ["--set", "data.source=photos", "--set", "model.arch=efficientnet_lite0"]
    for command in (["tune"], ["compare"], ["stage", "train"], ["doctor"]):
        done = lensflow(*command, *bad, cwd=project)
        assert done.returncode == 2 and "Traceback" not in done.stderr, command
        assert "needs at least 32" in done.stderr.strip().splitlines()[-1], command
    done = lensflow("run", "--resume", "--set", "data.source=photos", cwd=project)
    assert done.returncode == 2 and "--resume: models/last.pt not found" in done.stderr
