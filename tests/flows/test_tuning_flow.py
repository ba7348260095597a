"""`lensflow tune`: the Prefect tuning flow (data, prepare, validate, study) on tiny real data."""

import json

import mlflow

from lensflow.components import paths
from lensflow.flows import cli


def test_lensflow_tune_prepares_the_data_and_runs_a_study(tiny_cfg, capsys):
    args = ["--trials", "2", "--set", "train.epochs=1", "--set", "tune.pruner=none"]
    assert cli.main(["tune", *args]) == 0
    report = json.loads(paths.TUNING_REPORT.read_text())
    assert report["status"] == "ok" and report["counts"]["complete"] == 2
    assert paths.VALIDATION_REPORT.exists()
    out = capsys.readouterr().out
    assert f"tune: study {report['study']}: 2 new trials, 2 in all" in out

    client = mlflow.MlflowClient()
    study_run = client.get_run(report["mlflow_run_id"])
    assert study_run.data.tags["optuna.study"] == report["study"]
    experiment = study_run.info.experiment_id
    children = client.search_runs(
        experiment, f"tags.mlflow.parentRunId = '{report['mlflow_run_id']}'"
    )
    assert len(children) == 2

    # the stage as dvc.yaml runs it, tuning off (params.yaml): the study's report stays
    assert cli.main(["stage", "tune"]) == 0
    assert "no study (tune.enabled is false" in capsys.readouterr().out
    assert json.loads(paths.TUNING_REPORT.read_text()) == report
