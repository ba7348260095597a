"""`lensflow tune`: the Prefect tuning flow (data, prepare, validate, study) on tiny real data."""

import json

import mlflow

from cli import main as cli
from components.core import paths
from flows.training import training_flow


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


def test_training_flow_tunes_then_trains_with_the_best_params(tiny_cfg):
    overrides = [
        "tune.enabled=true",
        "tune.trials=2",
        "tune.pruner=none",
        "tune.space={train: {lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}}",
        "train.use_tuned=true",
        "train.epochs=2",
    ]
    summary = training_flow(params_path="params.yaml", overrides=overrides)
    best_lr = json.loads(paths.TUNING_REPORT.read_text())["best_params"]["train.lr"]

    client = mlflow.MlflowClient()
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs(
        parent.info.experiment_id, f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    step_runs = {run.data.tags["lensflow.step"]: run for run in children}
    assert {"validate", "tune", "train", "evaluate", "export", "register"} <= set(step_runs)
    assert float(step_runs["train"].data.params["train.lr"]) == best_lr  # what it trained with
    assert float(parent.data.params["train.lr"]) == tiny_cfg.train.lr  # params.yaml's value

    # every run of the flow, trials included, shows the data it used
    runs = client.search_runs([parent.info.experiment_id])
    assert any(run.data.tags.get("lensflow.step") == "tune-trial" for run in runs)
    for run in runs:
        digests = [data.dataset.digest for data in run.inputs.dataset_inputs]
        assert digests == [run.data.tags["data.md5"]], run.info.run_name
