"""The compare flow on tiny real data, against real MLflow and Prefect: scratch and transfer
arms on two fractions of the training split, one parent run, the pipeline's evaluator."""

import json

import mlflow
import pytest
import torch

from cli import main as cli
from components.core import config, paths
from components.data import prepared
from components.experiments import compare
from components.scoring import backends
from components.scoring.metrics import score
from components.training import models
from flows.compare import compare_flow
from tests.conftest import tiny_project, write_tiny_params

# A tiny transfer arm: ImageNet EfficientNet-Lite0 at 32 px, frozen backbone, 2 epochs.
TRANSFER = {
    "model.arch": "efficientnet_lite0",
    "model.pretrained": "efficientnet-lite0",
    "model.input_size": 32,
    "train.strategy": "feature_extraction",
    "train.lr": 0.01,
    "train.epochs": 2,
}
COMPARE = {"fractions": [1.0, 0.3], "scratch": {"train.epochs": 4}, "transfer": TRANSFER}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One `compare` of the tiny shapes project, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("project")
    with tiny_project(root):
        overrides = [f"compare={json.dumps(COMPARE)}"]
        cfg = config.load("params.yaml", overrides)
        result = compare_flow(params_path="params.yaml", overrides=overrides)
        report = json.loads((root / paths.COMPARE_REPORT).read_text())
        yield {"root": root, "cfg": cfg, "result": result, "report": report}


def _children(parent_id: str):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("lensflow")
    return client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def test_one_parent_run_with_a_child_run_per_arm_and_fraction(compared):
    parent = mlflow.get_run(compared["result"].mlflow_run_id)
    assert parent.info.run_name == "compare"
    arms = {
        r.info.run_name: r for r in _children(parent.info.run_id) if "compare.arm" in r.data.tags
    }
    assert set(arms) == {"scratch@100%", "transfer@100%", "scratch@30%", "transfer@30%"}
    transfer = arms["transfer@30%"].data
    assert transfer.tags["compare.arm"] == "transfer"
    assert transfer.tags["compare.fraction"] == "0.3"
    assert transfer.tags["compare.arch"] == "efficientnet_lite0"
    assert transfer.tags["compare.pretrained"] == "efficientnet-lite0"
    assert arms["scratch@30%"].data.tags["compare.pretrained"] == "none"
    assert transfer.params["model.input_size"] == "32"
    for run in arms.values():
        assert {"test/accuracy", "test/macro_f1", "best/epoch"} <= set(run.data.metrics)
        assert "data.md5" in run.data.tags
    assert "compare/accuracy_gain_30pct" in parent.data.metrics


def test_report_structure_and_regime_verdicts(compared):
    report = compared["report"]
    assert [(a["arm"], a["fraction"]) for a in report["arms"]] == [
        ("scratch", 1.0),
        ("transfer", 1.0),
        ("scratch", 0.3),
        ("transfer", 0.3),
    ]
    arms = {a["name"]: a for a in report["arms"]}
    assert arms["transfer@100%"]["epochs_run"] == 2 and arms["scratch@100%"]["epochs_run"] == 4
    assert (
        arms["scratch@100%"]["arch"] == "simple_cnn" and arms["scratch@100%"]["pretrained"] is None
    )
    for regime in report["regimes"]:
        scratch = arms[f"scratch@{regime['regime']}"]
        transfer = arms[f"transfer@{regime['regime']}"]
        gain = transfer["test_accuracy"] - scratch["test_accuracy"]
        assert regime["accuracy_gain"] == pytest.approx(gain, abs=1e-6)
        assert regime["transfer_beats_scratch"] == (gain > 0 and regime["mcnemar_p"] < 0.05)
        assert regime["verdict"].startswith(f"{regime['regime']} ({scratch['train_images']}")
        assert 0 <= regime["mcnemar_p"] <= 1
    assert report["test_images"] == len(prepared.load_split("test")[1])
    assert "transfer@30%" in compared["result"].table


def test_accuracy_is_the_evaluators_on_the_arms_model(compared):
    images, labels = prepared.load_split("test")
    for arm in compared["report"]["arms"]:
        model, spec = models.load_checkpoint(arm["checkpoint"])
        metrics, _ = score(backends.torch_predictor(model), images, labels, spec["classes"])
        assert arm["test_accuracy"] == metrics["accuracy"]
        assert arm["test_macro_f1"] == metrics["macro_f1"]
        run = mlflow.get_run(arm["mlflow_run_id"])
        assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"])


def test_small_regime_is_a_stratified_subset_with_every_class(compared):
    labels = torch.from_numpy(prepared.load_split("train")[1])
    index = compare.stratified_subset(labels, 0.3, compared["cfg"].seed)
    counts = torch.bincount(labels, minlength=10)
    assert torch.equal(torch.bincount(labels[index], minlength=10), (counts * 0.3).round().long())
    assert set(labels[index].tolist()) == set(range(10))
    small = {a["name"]: a["train_images"] for a in compared["report"]["arms"]}
    assert small["scratch@30%"] == small["transfer@30%"] == len(index)
    assert small["scratch@100%"] == len(labels)
    # smaller fractions are nested in larger ones; the same seed gives the same subset
    assert set(compare.stratified_subset(labels, 0.1, 42).tolist()) <= set(index.tolist())
    assert torch.equal(index, compare.stratified_subset(labels, 0.3, 42))


def test_plot_exists(compared):
    plot = compared["root"] / paths.COMPARE_PLOT
    assert plot.exists() and plot.stat().st_size > 10_000


def test_a_bad_override_is_one_clear_error(project, capsys):
    write_tiny_params(project)
    assert cli.main(["compare", "--set", "compare.transfer.model.arch=vgg"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lensflow: error: compare.transfer: 'model.arch'") and "\n" not in error
    assert not (project / "data").exists()  # refused before anything ran
