"""Documented recipes on photographs the tests make themselves (crops of scikit-learn's two
sample photographs, grayscale and RGB, 25 and 40 px), through the `lensflow` command's own
entry point with real Prefect and MLflow: a grayscale champion first, then the documented
transfer recipe (docs/training.md) on RGB images of another size."""

import json
import shutil

import mlflow
import pytest
import torch
import yaml

from cli import main as cli
from components import preflight
from components.core import config, paths
from components.core.errors import UserError
from components.core.params_pipeline import Model
from components.data import datasets, prepare, validate
from components.release import export, promote, registry
from components.training import models, train
from tests.conftest import REPO, TINY, documented_commands, write_photographs

NAME = "lensflow-classifier"


def _documented_transfer_recipe() -> list[str]:
    """The `--set` items of the transfer recipe in docs/training.md, less its data.source."""
    (recipe,) = [
        args
        for args in documented_commands(REPO / "docs/training.md")
        if args[0] == "run" and "model.pretrained=efficientnet-lite0" in args
    ]
    items = [
        value for flag, value in zip(recipe[1::2], recipe[2::2], strict=True) if flag == "--set"
    ]
    return [item for item in items if not item.startswith("data.source=")]


DOCUMENTED_RECIPE = _documented_transfer_recipe()


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def photo_project(tmp_path_factory):
    """A project on data/raw/photos whose champion is the default recipe's: a grayscale
    simple_cnn at 16 px (`lensflow run`)."""
    root = tmp_path_factory.mktemp("project")
    write_photographs(root / "data/raw/photos")
    params = {
        "data": {"source": "data/raw/photos"},
        "train": {"epochs": 3, "progress_bar": False},
        "promote": {"min_accuracy": 0.0, "min_macro_f1": 0.0},
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        (root / "params.yaml").write_text(yaml.safe_dump(config.from_dict(params).as_dict()))
        assert cli.main(["run"]) == 0
        grayscale = json.loads(paths.EXPORT_REPORT.read_text())["onnx"]["accuracy"]
        yield {"root": root, "grayscale_accuracy": grayscale}


def test_documented_transfer_recipe_after_a_grayscale_champion(photo_project, capfd):
    capfd.readouterr()
    fast = ["prepare.image_size=32", "train.epochs=2", "train.head_epochs=1"]
    assert cli.main(["run", *_sets(DOCUMENTED_RECIPE + fast)]) == 0
    assert "Traceback" not in capfd.readouterr().err

    _, spec = models.load_checkpoint(paths.CHECKPOINT)
    assert (spec["channels"], spec["image_size"], spec["input_size"]) == (3, 32, 64)
    assert (paths.PLOTS / "saliency.png").exists()  # saliency at 32 px, the network at 64
    gate = json.loads(paths.PROMOTION_REPORT.read_text())["gates"]["beats_champion"]
    # the champion re-scored on the same test files, decoded as its clients send them
    assert gate["champion_input"] == {"channels": 1, "image_size": 16}
    assert gate["champion_accuracy"] == photo_project["grayscale_accuracy"]
    # so does `lensflow evaluate` on this project's test split
    assert cli.main(["evaluate", "--model", f"models:/{NAME}/1", "--report", "v1.json"]) == 0
    v1 = json.loads((photo_project["root"] / "v1.json").read_text())
    assert v1["accuracy"] == photo_project["grayscale_accuracy"]


def test_pretrained_from_a_run_uri_is_that_models_backbone(photo_project):
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "1")  # the grayscale simple_cnn
    uri = f"runs:/{version.run_id}/model"
    preflight.check(config.load("params.yaml", [f"model.pretrained={uri}"]))
    meta = {"classes": ["a", "b", "c"], "channels": 1, "image_size": 16}
    spec = models.model_spec(Model(), {**meta, "mean": [0.5], "std": [0.25]})
    from_run, from_registry = models.build(spec, uri), models.build(spec, f"models:/{NAME}/1")
    first = [m.network.features[0][0].weight for m in (from_run, from_registry, models.build(spec))]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])

    parent = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    for source, message in [
        ("runs:/0123abc/model", "Run with id=0123abc not found"),
        (f"runs:/{parent}", f"run {parent} logged no checkpoint/checkpoint.pt"),
    ]:
        with pytest.raises(UserError, match=f"^model.pretrained {source}: {message}"):
            preflight.check(config.load("params.yaml", [f"model.pretrained={source}"]))


def test_a_data_gate_failing_inside_the_flow_logs_no_traceback(photo_project, capfd, caplog):
    broken = photo_project["root"] / "data/raw/broken"
    shutil.copytree(photo_project["root"] / "data/raw/photos", broken)
    (broken / "china" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    capfd.readouterr()
    assert cli.main(["run", "--set", "data.source=data/raw/broken"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lensflow: gate failed: the data failed")
    # Prefect logs the failed flow run, without the exception's traceback
    failed = [r for r in caplog.records if r.name.startswith("prefect") and r.levelname == "ERROR"]
    assert failed and not any(r.exc_info for r in failed)


def test_a_champion_of_other_classes_is_not_comparable_and_stays(photo_project):
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(NAME, "champion").version
    shapes = {**TINY, "train": {**TINY["train"], "epochs": 2}}  # ten other classes
    cfg = config.from_dict(shapes)
    datasets.run(cfg)
    prepare.run(cfg)
    assert validate.run(cfg).success
    train.run(cfg)
    export.run(cfg)
    paths.QUANTIZE_REPORT.unlink()  # the photographs' model's: not this one's

    registry.run(cfg)
    result = promote.run(cfg)
    gates = json.loads(paths.PROMOTION_REPORT.read_text())["gates"]
    assert not result.promoted and gates["same_classes"]["passed"] is False
    note = gates["beats_champion"]["note"]
    assert note == f"not comparable: the champion v{champion} predicts other classes"
    assert client.get_model_version_by_alias(NAME, "champion").version == champion
