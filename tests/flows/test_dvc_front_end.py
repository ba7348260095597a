"""`dvc repro`, `dvc exp` and `lensflow run` are front ends of the same components.

In a fresh git + DVC project on tiny data: every step of the Prefect flow reads only files its
dvc.yaml stage depends on (or writes itself), and every file it writes under models/, reports/,
plots/, metrics/ and data/prepared/ goes to a temporary name that is then renamed (a kill
leaves the old file or the whole new one); after the flow, `dvc repro` has nothing to do;
forcing train and evaluate reproduces the flow's checkpoint byte for byte; `dvc exp run -S
train.epochs=5` reruns tune, train and the stages after them, not prepare or validate; going
back to the baseline's params restores train from DVC's run cache and reuses its registered
version; and `dvc exp show` compares the experiment with its baseline on a dozen numbers at most.
"""

import csv
import fnmatch
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml
from prefect.context import TaskRunContext

from components.core import paths
from flows.training import training_flow
from tests.conftest import REPO, tiny_project

DVC = (sys.executable, "-m", "dvc")
# Read by every step, yet no stage input: the tracking store, params.yaml (dvc.yaml's `params`)
# and the raw data's .dvc file, read for the `data.md5` lineage tag (the data itself reaches the
# stages through prepare's outputs).
NOT_STAGE_INPUTS = ("mlflow.db", "mlartifacts", "params.yaml", ".dvc-site-cache", "data/raw/*.dvc")


def sh(*args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def stages_run(out: str, stages: dict) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {stage for stage in stages if f"Running stage '{stage}'" in out}


_opened: dict[str, list[tuple[str, bool]]] | None = None  # task name -> [(path, for writing)]
_written: list[str] | None = None  # every file opened for writing, by anyone, in order
_renamed: dict[str, str] | None = None  # os.rename / os.replace: source -> destination
_hooked = False


def _audit(event: str, args: tuple) -> None:
    """Python's audit hook: files opened, renamed and folders listed while the flow runs."""
    if _opened is None or event not in ("open", "os.rename", "os.listdir", "os.scandir"):
        return
    if not isinstance(args[0], str | bytes | os.PathLike):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    if event == "os.rename":
        _renamed[path] = os.path.abspath(os.fsdecode(args[1]))
        return
    writes = event == "open" and bool(args[2] & (os.O_WRONLY | os.O_RDWR))
    if writes:
        _written.append(path)
    task = TaskRunContext.get()
    if task is not None:
        _opened.setdefault(task.task.name, []).append((path, writes))


@contextmanager
def files_opened_by_task():
    """{task name: [(absolute path, opened for writing)]} of what runs inside, plus "written"
    (every file opened for writing) and "renamed" ({source: destination}); the hook stays
    (Python cannot remove one) but records nothing outside this block."""
    global _opened, _written, _renamed, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _opened, _written, _renamed = {}, [], {}
    recorded = {"tasks": _opened, "written": _written, "renamed": _renamed}
    try:
        yield recorded
    finally:
        _opened = _written = _renamed = None


def stage_inputs(opened: list[tuple[str, bool]], root: Path) -> set[str]:
    """Project files a stage read before writing them (what it wrote itself is no input; a
    name MLflow only probed, never there, neither)."""
    written, inputs = set(), set()
    for path, writes in opened:
        relative = Path(os.path.relpath(path, root))
        if relative.parts[0] in ("..", ".") or not os.path.exists(path):
            continue
        if writes:
            written.add(relative.as_posix())
        elif relative.as_posix() not in written:
            inputs.add(relative.as_posix())
    return inputs


def undeclared(inputs: set[str], spec: dict) -> set[str]:
    declared = list(spec.get("deps", []))
    for kind in ("outs", "metrics", "plots"):  # its own outputs (tune keeps its report)
        declared += [out if isinstance(out, str) else next(iter(out)) for out in spec.get(kind, [])]
    return {
        path
        for path in inputs
        if not any(path == d or path.startswith(f"{d}/") for d in declared)
        and not any(fnmatch.fnmatch(path, pattern) for pattern in NOT_STAGE_INPUTS)
        and not any(path.startswith(f"{pattern}/") for pattern in NOT_STAGE_INPUTS)
    }


def metric_columns(header: list[str], project: Path, stages: dict) -> list[str]:
    """The CSV columns of `dvc exp show` that are metrics: not the experiment's own columns,
    not a params.yaml key, not a dependency path."""

    def flat(tree: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, value in tree.items():
            keys |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
        return keys

    params = flat(yaml.safe_load((project / "params.yaml").read_text()))
    deps = {dep for spec in stages.values() for dep in spec.get("deps", [])}
    own = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
    return [column for column in header if column not in own | params | deps]


WATCHED = ("models", "reports", "plots", "metrics", "data/prepared")  # the pipeline's outputs


def copy_pipeline(project: Path) -> None:
    """dvc.yaml, .gitignore and the code dvc.yaml's stages depend on, into `project`."""
    shutil.copy(REPO / "dvc.yaml", project)
    shutil.copy(REPO / ".gitignore", project)
    for package in ("components", "flows"):  # dvc.yaml's code deps
        shutil.copytree(
            REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__")
        )


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """A fresh git + DVC project on TINY, and the flow run once in it with every file it
    opened, wrote and renamed recorded."""
    project = tmp_path_factory.mktemp("dvc-project")
    copy_pipeline(project)
    with tiny_project(project) as mp:
        mp.setenv("DVC_SITE_CACHE_DIR", str(project / ".dvc-site-cache"))
        sh("git", "init", "-q", "-b", "main", cwd=project)
        sh("git", "config", "user.email", "test@lensflow.invalid", cwd=project)
        sh("git", "config", "user.name", "lensflow test", cwd=project)
        with (project / ".git/info/exclude").open("a") as exclude:
            exclude.write(".dvc-site-cache/\n")
        sh(*DVC, "init", "-q", cwd=project)
        stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
        with files_opened_by_task() as recorded:
            summary = training_flow(params_path="params.yaml")
        yield {"project": project, "stages": stages, "summary": summary, **recorded}


def test_every_file_the_flow_writes_goes_to_a_temporary_name_then_is_renamed(flow):
    project = flow["project"]

    def watched(path: str) -> bool:
        relative = Path(os.path.relpath(path, project)).as_posix()
        return any(relative == w or relative.startswith(f"{w}/") for w in WATCHED)

    outputs = {str(p) for w in WATCHED for p in (project / w).rglob("*") if p.is_file()}
    assert {str(project / paths.ONNX), str(project / paths.ONNX_INT8)} <= outputs
    assert str(project / "plots/confusion_matrix.png") in outputs
    written = {path for path in flow["written"] if watched(path)}
    assert written, "the recording sees the writes"
    # opened for writing: a temporary name, renamed to its own name, or a scratch file the
    # step removed again; never a file the flow leaves behind
    in_place = sorted(path for path in written if path in outputs)
    assert in_place == [], "written in place, not to a temporary name"
    left = sorted(path for path in written if path not in flow["renamed"] and os.path.exists(path))
    assert left == [], "temporary files left behind"
    # every output arrived by a rename: also those written by C++ code (torch.save, Arrow)
    # that Python's audit hook does not see opening a file
    arrived = set(flow["renamed"].values())
    assert sorted(outputs - arrived) == [], "outputs that were not renamed into place"


def test_every_step_reads_only_what_its_dvc_stage_depends_on(flow):
    project, stages, opened = flow["project"], flow["stages"], flow["tasks"]
    inputs = {stage: stage_inputs(opened.get(stage, []), project) for stage in stages}
    assert "models/checkpoint.pt" in inputs["evaluate"]  # the recording sees the reads
    assert {stage: undeclared(inputs[stage], spec) for stage, spec in stages.items()} == {
        stage: set() for stage in stages
    }, "dvc.yaml: these stages read files they do not depend on"


def test_dvc_repro_and_experiments_match_the_flow(flow):
    project, stages, summary = flow["project"], flow["stages"], flow["summary"]
    assert (project / "data/raw/shapes.dvc").exists()  # the built-in data is DVC-tracked
    assert "up to date" in sh(*DVC, "status", cwd=project)
    assert "Running stage" not in sh(*DVC, "repro", cwd=project)

    # train and evaluate forced: the model made again from the same inputs, byte for byte
    checkpoint = (project / paths.CHECKPOINT).read_bytes()
    out = sh(*DVC, "repro", "--force", "--single-item", "train", "evaluate", cwd=project)
    assert stages_run(out, stages) == {"train", "evaluate"}
    assert (project / paths.CHECKPOINT).read_bytes() == checkpoint
    reproduced = json.loads(paths.EVALUATION_REPORT.read_text())["accuracy"]
    assert reproduced == summary["test_accuracy"]

    # an experiment on the committed baseline: what reruns, and what `dvc exp show` compares
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "baseline", cwd=project)
    out = sh(*DVC, "exp", "run", "-S", "train.epochs=5", cwd=project)
    assert stages_run(out, stages) == set(stages) - {"prepare", "validate"}
    assert json.loads(paths.TRAINING_REPORT.read_text())["epochs_run"] == 5
    five_epochs = json.loads(paths.EVALUATION_REPORT.read_text())["accuracy"]

    # back to the baseline's params: DVC restores train to quantize from its run cache, never
    # register and promote, whose outputs speak for the registry as it is now
    out = sh(*DVC, "exp", "run", "-S", "train.epochs=8", cwd=project)
    assert "Stage 'train' is cached - skipping run" in out
    assert stages_run(out, stages) == {
        "tune",  # a persistent output: never from the run cache either
        "register",
        "promote",
    }
    # the same checkpoint again: its version is reused, no third one registered
    registered = json.loads(paths.REGISTRY_REPORT.read_text())
    assert (registered["version"], registered["reused"]) == (summary["version"], True)
    assert len(mlflow.MlflowClient().search_model_versions("name = 'lensflow-classifier'")) == 2

    table = list(csv.DictReader(io.StringIO(sh(*DVC, "exp", "show", "--csv", cwd=project))))
    metrics = metric_columns(list(table[0]), project, stages)
    assert "test_accuracy" in metrics and len(metrics) <= 12, metrics
    rows = {row["Experiment"] or row["rev"]: row for row in table}
    experiment = next(row for row in table if row["Experiment"] and row["epochs_run"] == "5")
    assert float(rows["main"]["test_accuracy"]) == reproduced
    assert float(experiment["test_accuracy"]) == five_epochs != reproduced  # its own numbers
    assert "metrics/evaluation.json  test_accuracy" in sh(
        *DVC, "metrics", "diff", "main", "--all", cwd=project
    )

    # every MLflow run (flow, dvc repro, dvc exp) shows its data: a dataset input whose digest
    # is the run's data.md5 tag, the DVC hash of the data from the first step on
    data_md5 = yaml.safe_load((project / "data/raw/shapes.dvc").read_text())["outs"][0]["md5"]
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("lensflow").experiment_id])
    for run in runs:
        digests = [data.dataset.digest for data in run.inputs.dataset_inputs]
        assert digests == [run.data.tags["data.md5"]], run.info.run_name
    assert {run.data.tags["data.md5"] for run in runs if run.info.run_name == "train"} == {data_md5}
