"""`task: detection` end to end on a tiny built-in set, against the session's MLflow server
(PostgreSQL behind it): the Prefect flow validates, trains, evaluates, exports with parity,
registers and promotes the first version; a second version of the same detector is gated out
by the paired bootstrap; `lensflow serve` and `lensflow predict` return the same boxes in the
image's pixels, and /predict keeps its errors."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from components.core import config, paths
from components.detection import train
from components.detection_release import export, promote, registry
from serving import batch
from tests.conftest import _track_into, tiny_project
from tests.servers import free_port
from tests.serving.conftest import request, start_server

NAME = "lensflow-detector-e2e"  # the session server is shared: a name of this test's own
TINY_DETECTION = {
    "task": "detection",
    "tracking": {"experiment": "lensflow-detection-e2e"},
    "detection": {
        "synthetic_images": 24, "synthetic_size": 32, "image_size": 32,
        "score_threshold": 0.0,  # a barely trained detector still answers with boxes
        "epochs": 2, "batch_size": 8, "lr": 0.003,
    },
    "train": {"warmup_epochs": 0},
    "registry": {"model_name": NAME},
    "promote": {"min_map": 0.0, "bootstrap_samples": 20},
}  # fmt: skip


@pytest.fixture(scope="module")
def detection_project(mlflow_on_postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("detection-flow")
    with tiny_project(root) as mp:
        _track_into(mp, mlflow_on_postgres.url)
        cfg = config.from_dict(TINY_DETECTION)
        (root / "params.yaml").write_text(yaml.safe_dump(cfg.as_dict()))
        yield root, cfg, mlflow_on_postgres.url


def test_detection_runs_end_to_end_and_serves_boxes(detection_project, tmp_path):
    from flows.training import training_flow

    root, cfg, url = detection_project
    summary = training_flow(params_path="params.yaml")
    assert json.loads(paths.VALIDATION_REPORT.read_text())["success"]
    assert summary["export_parity"] and json.loads(export.REPORT.read_text())["n_images"] > 0
    assert summary["promoted"] and summary["version"] == summary["champion_version"] == "1"
    decided = json.loads(paths.PROMOTION_REPORT.read_text())
    assert {g for g, r in decided["gates"].items() if not r["passed"]} == set()
    assert decided["gates"]["bootstrap"]["note"] == "there is no champion yet"
    # promote re-scored the registered ONNX with the evaluator's decoder: evaluate's mAP
    evaluated = json.loads(paths.EVALUATION_REPORT.read_text())["map"]
    assert decided["gates"]["min_map"]["value"] == pytest.approx(evaluated, abs=1e-3)
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "1")
    assert version.tags["lensflow.task"] == "detection"
    assert json.loads(version.tags["lensflow.export_parity"])["parity"]
    proto = mlflow.onnx.load_model(f"models:/{NAME}/1")
    meta = {p.key: p.value for p in proto.metadata_props}
    classes = ["circle", "square", "triangle"]
    assert meta["task"] == "detection" and json.loads(meta["classes"]) == classes

    # the same detector again, as v2: no gain, bootstrap p = 1, it stays @challenger
    train.CHECKPOINT.write_bytes(train.CHECKPOINT.read_bytes() + b"\0")  # another sha256
    assert registry.run(cfg).version == "2"
    second = promote.run(cfg)
    gates = json.loads(paths.PROMOTION_REPORT.read_text())["gates"]
    assert not second.promoted and second.champion_version == "1"
    assert gates["bootstrap"]["value"] == 1.0 and gates["bootstrap"]["map_difference"] == 0.0
    assert not gates["beats_champion"]["passed"] and gates["same_classes"]["passed"]
    assert client.get_model_version_by_alias(NAME, "challenger").version == "2"

    # serve @champion and predict with it: boxes in the image's own pixels, the same for both
    raw = sorted((root / "data/raw/detection_shapes/images").rglob("*.png"))[0]
    image = Image.open(raw).convert("RGB").resize((80, 48))
    png = tmp_path / "inputs" / "wide.png"
    png.parent.mkdir()
    image.save(png)
    port = free_port()
    server = start_server(root, port, tracking_uri=url)
    try:
        status, answer, _ = request(port, "POST", "/predict", png.read_bytes(),
                                    {"Content-Type": "image/png"})  # fmt: skip
        bad = request(port, "POST", "/predict", b"not an image", {"Content-Type": "image/png"})
        served = request(port, "GET", "/model")[1]["served"]
    finally:
        server.kill()
        server.wait()
    assert status == 200 and answer["model_version"] == "1", answer
    found = answer["predictions"][0]["boxes"]
    assert found and {b["class"] for b in found} <= set(classes)
    corners = np.array([b["box"] for b in found])
    assert corners[:, [0, 2]].max() <= 80 and corners[:, [1, 3]].max() <= 48
    assert corners[:, 2].max() > 32  # scaled to the 80 px image, not the model's 32 px
    assert bad[0] == 415 and "not a supported image format" in bad[1]["error"]["message"]
    assert served["task"] == "detection" and served["golden"]["status"] == "passed"

    result = batch.run(cfg, [str(png.parent)], None, tmp_path / "predictions")
    table = pd.read_parquet(result.parquet)
    assert result.scored == 1 and list(table.columns) == list(batch.DETECTION_COLUMNS)
    by_server = sorted((b["class"], round(b["score"], 4)) for b in found)
    assert sorted(zip(table["class"], table["score"].round(4), strict=True)) == by_server
