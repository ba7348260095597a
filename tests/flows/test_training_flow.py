"""The Prefect training flow end to end on tiny real data, with real MLflow and Prefect."""

import json
from pathlib import Path

import mlflow
import pytest

from components.core import paths, tracking
from components.core.errors import GateFailed
from components.data import prepared
from components.release import promotion_log, registry
from components.scoring import backends
from components.scoring.metrics import score
from flows.training import training_flow


def test_flow_trains_exports_and_registers_a_champion(tiny_cfg):
    summary = training_flow(params_path="params.yaml")

    assert summary["promoted"] and summary["champion_version"] == summary["version"] == "1"
    for report in (
        paths.VALIDATION_REPORT,
        paths.EVALUATION_REPORT,
        paths.EXPORT_REPORT,
        paths.REGISTRY_REPORT,
        paths.PROMOTION_REPORT,
    ):
        assert report.exists(), report
    evaluation = json.loads(paths.EVALUATION_REPORT.read_text())

    # the champion resolves to an ONNX model scoring exactly what the flow reported
    session, meta = registry.load_onnx_session(registry.champion_uri("lensflow-classifier"))
    classes = meta["classes"]
    images, labels = prepared.load_split("test")
    metrics, _ = score(backends.onnx_predictor(session), images, labels, classes)
    assert metrics["accuracy"] == evaluation["accuracy"] == summary["test_accuracy"]

    # `lensflow evaluate` on the champion reproduces the flow's report
    from cli import main as cli

    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                registry.champion_uri("lensflow-classifier"),
                "--report",
                "champion.json",
            ]
        )
        == 0
    )
    assert json.loads(Path("champion.json").read_text())["accuracy"] == evaluation["accuracy"]

    # one parent run with a child run per step, all carrying lineage
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("lensflow").experiment_id
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs(experiment, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["lensflow.step"] for r in children) == [
        "evaluate",
        "export",
        "promote",
        "quantize",
        "register",
        "train",
        "validate",
    ]
    assert parent.data.params["train.epochs"] == "8"
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert flow_run_id != "none"
    version = client.get_model_version("lensflow-classifier", "1")
    assert version.tags["prefect.flow_run_id"] == flow_run_id
    (decision,) = promotion_log.history(tiny_cfg)  # the promotion log names the flow run
    assert decision["actor"] == f"flow-run:{flow_run_id}" and decision["to_version"] == "1"
    assert (
        version.tags["data.md5"] and version.tags["params.hash"] == parent.data.tags["params.hash"]
    )

    # the UI opens the experiment on its training runs, each showing the data it used
    kind = client.get_experiment(experiment).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development" and summary["experiment_id"] == experiment
    assert tracking.runs_page(experiment).endswith(
        f"/#/experiments/{experiment}?workflowType=machine_learning"  # opens on runs
    )
    for run in [parent, *children]:
        (data,) = run.inputs.dataset_inputs
        assert data.dataset.digest == run.data.tags["data.md5"]
        assert (data.dataset.name, json.loads(data.dataset.source)) == (
            "shapes",
            {"uri": "data/raw/shapes"},
        )


def test_flow_stops_before_training_on_data_that_fails_validation(tiny_cfg, project):
    from components.data import datasets

    datasets.run(tiny_cfg)
    broken = project / "data/raw/shapes/checker_2/truncated.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")

    with pytest.raises(GateFailed, match="validation"):
        training_flow(params_path="params.yaml")

    report = json.loads(paths.VALIDATION_REPORT.read_text())
    assert not report["success"]
    assert report["issues"][0]["path"] == "checker_2/truncated.png"
    assert not paths.CHECKPOINT.exists()
    assert broken.exists()  # reported, never deleted
