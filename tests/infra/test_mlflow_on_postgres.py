"""Every lensflow command unchanged against an MLflow tracking server whose backend store is
PostgreSQL and whose artifacts the server serves (the session fixture `mlflow_on_postgres`):
a full `lensflow run` on digits in a fresh project, then `lensflow evaluate` of the champion
through the server."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import psycopg2
import pytest
import yaml

from components.core import config

MODEL = "lensflow-classifier"


def _lensflow(project, env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def digits_run(mlflow_on_postgres, prefect_server, tmp_path_factory):
    """A fresh project with the default params (digits), `lensflow run` and then
    `lensflow evaluate --model models:/…@champion`, both against the server (and the Prefect
    server, as a team runs them)."""
    project = tmp_path_factory.mktemp("digits-on-postgres")
    # the default params (digits, simple_cnn), trained for 4 epochs instead of 20: ~0.98
    params = config.from_dict({"train": {"progress_bar": False, "epochs": 4}}).as_dict()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = prefect_server.client_env(
        MLFLOW_TRACKING_URI=mlflow_on_postgres.url,
        PREFECT_HOME=str(project / ".prefect"),
        DVC_SITE_CACHE_DIR=str(project / ".dvc-site-cache"),
    )
    run = _lensflow(project, env, "run")
    evaluation = _lensflow(project, env, "evaluate", "--model", f"models:/{MODEL}@champion")
    return {"project": project, "run": run, "evaluate": evaluation}


def test_a_full_run_logs_its_runs_and_model_to_the_server_on_postgres(
    digits_run, mlflow_on_postgres
):
    run = digits_run["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_on_postgres.url)
    experiment = client.get_experiment_by_name("lensflow")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    steps = {r.data.tags.get("lensflow.step") for r in runs}
    assert {"train", "evaluate", "export", "register"} <= steps
    assert {r.info.status for r in runs} == {"FINISHED"}
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id in {r.info.run_id for r in runs}
    # the server kept them in PostgreSQL, and the model's files in its artifacts folder
    with psycopg2.connect(mlflow_on_postgres.backend_store) as db, db.cursor() as cursor:
        cursor.execute(
            "select count(*) from runs where experiment_id = %s", [experiment.experiment_id]
        )
        assert cursor.fetchone()[0] == len(runs)
        cursor.execute("select version from model_versions where name = %s", [MODEL])
        assert str(champion.version) in {str(row[0]) for row in cursor.fetchall()}
    assert list(mlflow_on_postgres.artifacts.rglob("model.onnx"))
    ui = f"MLflow UI: {mlflow_on_postgres.url}/#/experiments/{experiment.experiment_id}?"
    assert ui in run.stdout  # the server is the UI: no `mlflow ui` to start
    assert not (digits_run["project"] / "mlflow.db").exists()
    assert not (digits_run["project"] / "mlartifacts").exists()


def test_evaluate_scores_the_champion_through_the_server(digits_run):
    evaluation = digits_run["evaluate"]
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.loads((digits_run["project"] / "model-evaluation.json").read_text())
    registered = json.loads((digits_run["project"] / "reports/evaluation.json").read_text())
    assert report["model"] == f"models:/{MODEL}@champion"
    # the champion's ONNX through the server, on the raw files of the test split: exactly
    # what the run's evaluation reported (as its sqlite twin, test_training_flow, asserts)
    assert (report["n_images"], report["accuracy"], report["macro_f1"]) == (
        registered["n_images"],
        registered["accuracy"],
        registered["macro_f1"],
    )
    assert report["accuracy"] >= 0.95  # digits, 4 epochs: 0.98
