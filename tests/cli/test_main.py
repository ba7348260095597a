"""The `lensflow` command as a user runs it: exit codes, one-line errors, fast --help."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from components.data import datasets
from tests.conftest import REPO, trained_copy, write_tiny_params


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


def test_validate_on_a_detection_folder_is_exit_2_naming_its_gate(project, capsys):
    from PIL import Image

    from cli import main as cli

    (project / "boxes" / "images").mkdir(parents=True)  # not one class named "images"
    Image.new("RGB", (40, 30)).save(project / "boxes" / "images" / "a.png")
    (project / "boxes" / "annotations.json").write_text("{}")
    assert cli.main(["validate", "boxes"]) == 2
    err = capsys.readouterr().err
    assert "boxes: a detection dataset" in err and "--set task=detection" in err


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


# Runs `lensflow` and records, as it exits, which heavy libraries it had imported.
WATCHED_IMPORTS = """
import atexit, json, sys
def _record():
    heavy = ("torch", "prefect", "mlflow")
    with open(sys.argv[1], "w") as out:
        json.dump(sorted(m for m in heavy if m in sys.modules), out)
atexit.register(_record)
from cli.main import main
sys.exit(main(sys.argv[2:]))
"""
NOT_MADE = ("data", "mlflow.db", ".prefect", "mlartifacts", "models", "reports")


def lensflow_before_any_work(*args, cwd):
    """`lensflow ARGS` with its own Prefect home in the project; returns the completed process
    and the heavy libraries (torch, prefect, mlflow) it imported."""
    imported = cwd / "imported.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(cwd / ".prefect")}
    done = subprocess.run(
        [sys.executable, "-c", WATCHED_IMPORTS, str(imported), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, json.loads(imported.read_text())


@pytest.mark.parametrize("mistake", PREFLIGHT_MISTAKES)
def test_preflight_mistakes_cost_one_line_before_any_work(project, photographs, mistake):
    overrides, message = PREFLIGHT_MISTAKES[mistake]
    args = ["run", *[a for o in overrides for a in ("--set", o)]]
    done, imported = lensflow_before_any_work(*args, cwd=project)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensflow: error: ") and message in lines[0]
    # no torch, no Prefect (its temporary server), no MLflow; nothing made in the project
    assert imported == []
    assert [name for name in NOT_MADE if (project / name).exists()] == []


TOO_SMALL = ["--set", "data.source=photos", "--set", "model.arch=efficientnet_lite0"]
EVERY_PREFLIGHT = {  # every command that runs the preflight, and a mistake it finds
    "run": (["run", *TOO_SMALL], "needs at least 32"),
    "run --resume": (["run", "--resume", "--set", "data.source=photos"], "--resume: models/"),
    "tune": (["tune", *TOO_SMALL], "needs at least 32"),
    "compare": (["compare", *TOO_SMALL], "needs at least 32"),
    "doctor": (["doctor", *TOO_SMALL], "needs at least 32"),
    "stage prepare": (["stage", "prepare", "--set", "data.source=nowhere"], "folder not found"),
    "stage tune": (["stage", "tune", *TOO_SMALL], "needs at least 32"),
    "stage train": (["stage", "train", *TOO_SMALL], "needs at least 32"),
    "stage train --resume": (["stage", "train", "--resume"], "--resume: models/last.pt not"),
}


@pytest.mark.parametrize("command", EVERY_PREFLIGHT)
def test_preflight_runs_before_any_work_of_every_command_that_trains(project, photographs, command):
    args, message = EVERY_PREFLIGHT[command]
    done, imported = lensflow_before_any_work(*args, cwd=project)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert message in line
    assert imported == []
    assert [name for name in NOT_MADE if (project / name).exists()] == []


@pytest.fixture(scope="module")
def trained_project(trained_template, tmp_path_factory):
    """The session's prepared and trained tiny project (tests/conftest.py), copied."""
    return trained_copy(trained_template, tmp_path_factory, "cli-trained")


def _in_copy(trained_project, tmp_path) -> tuple[Path, dict]:
    project = tmp_path / "project"
    shutil.copytree(trained_project, project)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    return project, env


def _as_in_a_terminal() -> None:
    """Both signals at their default, as a terminal's foreground command gets them: a test run
    started in the background (`make test &`, nohup) would pass them on ignored."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGINT, 130, ""), (signal.SIGHUP, 129, "lensflow: stopped by SIGHUP")],
)
def test_ctrl_c_and_sighup_stop_training_with_their_exit_codes(
    trained_project, tmp_path, signum, code, said
):
    project, env = _in_copy(trained_project, tmp_path)
    last = project / "models/last.pt"
    last.unlink(missing_ok=True)  # its arrival: training has started
    long = ["--set", "train.epochs=500", "--set", "train.patience=500"]
    training = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "stage", "train", *long],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and training.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert training.poll() is None and last.exists(), training.stderr.read()[-3000:]
        training.send_signal(signum)
        _, err = training.communicate(timeout=120)
    finally:
        training.kill()
    assert training.returncode == code, err[-3000:]
    assert "Traceback" not in err and err.strip().endswith(said), err[-3000:]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs(
        [client.get_experiment_by_name("lensflow").experiment_id],
        "tags.`lensflow.step` = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert run.info.status == "KILLED", err[-3000:]  # not FAILED: stopped from outside


def test_doctor_exits_1_when_the_model_cannot_overfit_one_batch(trained_project, tmp_path):
    project, env = _in_copy(trained_project, tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "doctor", "--set", "train.lr=1e-9"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("doctor: the model CANNOT overfit one batch of 32 images")
