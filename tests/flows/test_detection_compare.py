"""The compare flow under task: detection, through the `lensflow` command with real Prefect and
MLflow: a detector from scratch against one whose backbone is a grayscale lensflow classifier
(a tiny one, its checkpoint logged as a register run logs it), on two fractions of a tiny
built-in detection set."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
import yaml

from cli import main as cli
from components.core import config, paths
from components.core.params_pipeline import Model
from components.detection import model, train
from components.training import models
from tests.conftest import _track_into
from tests.flows.test_detection_flow import TINY_DETECTION

PARAMS = {
    **TINY_DETECTION,
    "tracking": {"experiment": "lensflow-detection-compare"},
    "detection": {**TINY_DETECTION["detection"], "epochs": 1},
}


def _classifier(path, arch: str = "simple_cnn", steps: int = 0) -> dict:
    """A grayscale lensflow classifier's checkpoint (`models.save_checkpoint`, as train writes
    it) after `steps` SGD steps on random images: its batch-norm statistics moved too."""
    meta = {"classes": ["a", "b"], "channels": 1, "image_size": 16, "mean": [0.4], "std": [0.2]}
    spec = models.model_spec(Model(arch=arch, widths=[8, 16, 32]), meta)
    classifier = models.build(spec).train()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=generator)
        loss = classifier(images).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    models.save_checkpoint(classifier, spec, path)
    return torch.load(path, weights_only=True)


def _log_checkpoint(path) -> str:
    """A run that logged `path` where a registered lensflow model's run keeps it."""
    with mlflow.start_run(run_name="classifier") as run:
        mlflow.log_artifact(str(path), "checkpoint")
    return run.info.run_id


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A tiny grayscale simple_cnn classifier, then `lensflow compare` under task: detection
    with `feature_extraction` from it, both in one MLflow store."""
    root = tmp_path_factory.mktemp("detection-compare")
    with pytest.MonkeyPatch.context() as mp:
        _track_into(mp, f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)  # MLflow's artifacts go under the cwd
        checkpoint = root / "classifier" / "checkpoint.pt"
        classifier = _classifier(checkpoint, steps=3)
        run_id = _log_checkpoint(checkpoint)

        (root / "detection").mkdir()
        mp.chdir(root / "detection")
        transfer = {
            "detection.pretrained": f"runs:/{run_id}",
            "train.strategy": "feature_extraction",
        }
        params = {**PARAMS, "compare": {"fractions": [1.0, 0.5], "transfer": transfer}}
        (root / "detection/params.yaml").write_text(
            yaml.safe_dump(config.from_dict(params).as_dict())
        )
        assert cli.main(["compare"]) == 0
        report = json.loads(paths.COMPARE_REPORT.read_text())
        yield {"root": root, "run_id": run_id, "classifier": classifier, "report": report}


def test_compare_runs_scratch_vs_transfer_for_detection(compared):
    report, run_id = compared["report"], compared["run_id"]
    assert report["task"] == "detection"
    arms = {a["name"]: a for a in report["arms"]}
    assert list(arms) == ["scratch@100%", "transfer@100%", "scratch@50%", "transfer@50%"]
    assert arms["scratch@50%"]["train_images"] == arms["transfer@50%"]["train_images"]
    assert arms["scratch@50%"]["train_images"] < arms["scratch@100%"]["train_images"]
    assert (arms["scratch@100%"]["backbone"], arms["scratch@100%"]["pretrained"]) == (
        "detector",
        None,
    )
    assert arms["transfer@100%"]["backbone"] == "simple_cnn"
    assert arms["transfer@100%"]["pretrained_run_id"] == run_id
    for r in report["regimes"]:
        scratch, transfer = arms[f"scratch@{r['regime']}"], arms[f"transfer@{r['regime']}"]
        gain = transfer["test_map"] - scratch["test_map"]
        assert r["map_gain"] == pytest.approx(gain, abs=1e-6)
        assert 0 < r["bootstrap_p"] <= 1 and r["transfer_beats_scratch"] == (
            gain > 0 and r["bootstrap_p"] < 0.05
        )
        assert r["verdict"].startswith(f"{r['regime']} ({scratch['train_images']} training")

    # the transfer arm's backbone is the classifier's stages: frozen, so still its weights,
    # the grayscale first convolution spread over R, G, B by luminance
    backbone, state = train.read_checkpoint(arms["transfer@50%"]["checkpoint"])
    grey = compared["classifier"]["state_dict"]["network.features.0.0.weight"]
    rgb = state["backbone.body.features.0.0.weight"]
    assert torch.allclose(rgb, grey * torch.tensor(model.LUMINANCE).view(1, 3, 1, 1))
    assert torch.allclose(rgb.sum(1, keepdim=True), grey)
    for name in ("features.2.1.running_mean", "features.1.0.weight"):
        assert torch.equal(state[f"backbone.body.{name}"],
                           compared["classifier"]["state_dict"][f"network.{name}"])  # fmt: skip
    # its test mAP is the evaluator's on that checkpoint
    cfg = config.load("params.yaml")
    detector = model.build(cfg, 3, backbone)
    detector.load_state_dict(state)
    assert arms["transfer@50%"]["test_map"] == train.evaluate(detector.eval(), "test")["map"]

    parent = mlflow.get_run(report["mlflow_run_id"])
    assert "compare/map_gain_50pct" in parent.data.metrics
    child = mlflow.get_run(arms["transfer@50%"]["mlflow_run_id"]).data
    assert child.tags["compare.arm"] == "transfer" and child.tags["compare.fraction"] == "0.5"
    assert child.tags["lensflow.pretrained_run_id"] == run_id
    assert child.params["detection.pretrained"] == f"runs:/{run_id}"
    assert child.metrics["test/map"] == pytest.approx(arms["transfer@50%"]["test_map"])
    assert (paths.COMPARE_PLOT).stat().st_size > 10_000


def test_a_classifier_that_cannot_be_a_backbone_is_one_clear_error(compared, capsys):
    alexnet = compared["root"] / "alexnet" / "checkpoint.pt"
    _classifier(alexnet, "mini_alexnet")
    uri = f"runs:/{_log_checkpoint(alexnet)}"
    capsys.readouterr()
    assert cli.main(["stage", "train", "--set", f"detection.pretrained={uri}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's download bar
    assert error.startswith(f"lensflow: error: detection.pretrained {uri}: a mini_alexnet")
    assert cli.main(["compare", "--set", 'compare.transfer={"model.arch": "resnet18"}']) == 2
    assert "'model.arch' is not a detector key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("strategy", "unfreeze", "learnt", "moved"),
    [("gradual_unfreeze", {}, [0, 1], {2}), ("two_stage", {"unfreeze_stages": 2}, [0, 2], {1, 2})],
)
def test_two_stage_and_gradual_unfreeze_transfer_stage_by_stage(
    compared, strategy, unfreeze, learnt, moved
):
    """Classification's schedule over the classifier's three stages: the head epoch alone
    first, then the top stage(s); a stage frozen throughout keeps its weights and its
    batch-norm statistics, one that learnt moved both."""
    cfg = config.load(
        "params.yaml",
        [f"detection.pretrained=runs:/{compared['run_id']}", "detection.epochs=2",
         f"train.strategy={strategy}", "train.head_epochs=1"]
        + [f"train.{k}={v}" for k, v in unfreeze.items()],
    )  # fmt: skip
    images, targets, _ = train.split_data("train")
    fitted = train.fit(cfg, images, targets, 3)
    assert [e["trainable_stages"] for e in fitted.history] == learnt
    assert train.source(fitted)["strategy"] == strategy and not fitted.frozen
    state = fitted.detector.state_dict()
    for stage in range(3):
        for name in (f"features.{stage}.1.running_mean", f"features.{stage}.1.weight"):
            same = torch.equal(state[f"backbone.body.{name}"],
                               compared["classifier"]["state_dict"][f"network.{name}"])  # fmt: skip
            assert same == (stage not in moved), (stage, name)
