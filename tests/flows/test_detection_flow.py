"""`task: detection` end to end on a tiny built-in set, against the session's MLflow server
(PostgreSQL behind it): the Prefect flow validates, trains, evaluates, exports with parity,
registers and promotes the first version; evaluate logs precision-recall curves and a gallery
of misdetections; a second version of the same detector is gated out by the paired bootstrap;
`lensflow monitor` raises no alert on fresh shapes and a named box-statistics alert on images
without shapes; `lensflow serve --int8` and `lensflow predict --int8` return the same boxes in
the image's pixels from the int8 variant (forced through quantize's speed and mAP gates, golden
check by box matching, which quantize makes too), and /predict keeps its errors."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cli import main as cli
from components.core import config, paths
from components.detection import evaluate, monitor, synthetic, train
from components.detection import prepare as detection_prepare
from components.detection_release import export, promote, registry
from components.detection_release import quantize as detection_quantize
from components.drift import drift
from serving import batch
from serving import model as serving_model
from tests.conftest import _track_into, tiny_project
from tests.servers import free_port
from tests.serving.conftest import request, start_server

NAME = "lensflow-detector-e2e"  # the session server is shared: a name of this test's own
TINY_DETECTION = {
    "task": "detection",
    "tracking": {"experiment": "lensflow-detection-e2e"},
    "detection": {
        "synthetic_images": 48, "synthetic_size": 32, "image_size": 32,
        # ~20 boxes an image at 0.2; 40 epochs (~10 s) give scores that depend on the image,
        # which the monitoring of box statistics needs (at 20 on an AMD EPYC they did not)
        "score_threshold": 0.2, "epochs": 40, "batch_size": 8, "lr": 0.01,
    },
    "prepare": {"test_fraction": 0.4},  # ~19 test images: the monitor's reference profile
    "train": {"warmup_epochs": 0},
    "registry": {"model_name": NAME},
    "promote": {"min_map": 0.0, "bootstrap_samples": 20},
}  # fmt: skip
# quantize's gate wide open: the tiny detector's int8 is slower than fp32, but ships here
INT8_SHIPS = {"quantize": {"min_speedup": 0.01, "max_drop": 100.0}}


@pytest.fixture(scope="module")
def detection_project(mlflow_on_postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("detection-flow")
    with tiny_project(root) as mp:
        _track_into(mp, mlflow_on_postgres.url)
        cfg = config.from_dict({**TINY_DETECTION, **INT8_SHIPS})
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
    assert_evaluation_figures(client)
    assert version.tags["lensflow.int8"] == "shipped"
    assert_golden_checks(cfg)
    assert_quantize_refuses_what_serving_would(cfg)
    assert_monitoring_box_statistics(cfg, tmp_path)

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
    server = start_server(root, port, "serve.int8=true", tracking_uri=url)
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
    assert served["variant"] == "int8" and served["golden"]["box_agreement"] >= 0.9

    int8 = config.load("params.yaml", ["serve.int8=true"])
    result = batch.run(int8, [str(png.parent)], None, tmp_path / "predictions")
    table = pd.read_parquet(result.parquet)
    assert result.scored == 1 and list(table.columns) == list(batch.DETECTION_COLUMNS)
    by_server = sorted((b["class"], round(b["score"], 4)) for b in found)
    assert sorted(zip(table["class"], table["score"].round(4), strict=True)) == by_server

    assert_champion_rescored_at_its_size(root, decided["gates"]["min_map"]["value"])


def assert_champion_rescored_at_its_size(root, champion_map: float) -> None:
    """A candidate at 64 px (the same weights, prepared, exported and registered at 64 px, as
    v3) against the 32 px champion: the champion is scored on the same test images read again
    from the raw folder at 32 px (its mAP is then the one its own promotion measured), not on
    the candidate's 64 px shard; the raw files stay as they were."""
    raw = root / "data/raw/detection_shapes"
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    other = config.load("params.yaml", ["detection.image_size=64"])
    detection_prepare.run(other)
    paths.QUANTIZE_REPORT.unlink()  # no int8 for v3 (the shipped one is v1's)
    train.CHECKPOINT.write_bytes(train.CHECKPOINT.read_bytes() + b"\0")
    assert export.run(other).parity and registry.run(other).version == "3"
    decided = promote.run(other)
    record = json.loads(paths.PROMOTION_REPORT.read_text())
    gate, champion = record["gates"]["beats_champion"], record["evidence"]["champion"]
    assert not decided.promoted and decided.champion_version == "1"
    assert gate["champion_map"] == pytest.approx(champion_map, abs=1e-9)
    assert (gate["champion_image_size"], gate["candidate_image_size"]) == (32, 64)
    assert champion["test_images_from"] == "raw images read again at 32 px"
    explained = promote.summary(decided).splitlines()[1]
    assert "v3 " in explained and "at 64 px, champion v1 " in explained, explained
    assert "at 32 px (raw images read again at 32 px)" in explained and "bootstrap p" in explained
    assert record["gates"]["bootstrap"]["samples"] == 20
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before


def assert_golden_checks(cfg) -> None:
    """fp32 within serve.golden_atol of its golden outputs; int8, whose raw outputs are not,
    by its boxes against the golden ones decoded: boxes moved or given another class fail."""
    source = serving_model.parse(f"models:/{NAME}/1")
    fp32 = serving_model.load(source, "1", cfg.serve).info
    assert fp32["variant"] == "fp32" and fp32["golden"]["max_abs_diff"] <= cfg.serve.golden_atol
    onnx_bytes, golden, info = serving_model._download(NAME, "1", want_int8=True)
    session = serving_model.session(onnx_bytes, 1)
    with pytest.raises(serving_model.Refused, match="serve.golden_atol"):
        serving_model.check_golden_outputs(session, golden, cfg.serve)
    int8 = cfg.serve.model_copy(update={"int8": True})
    checked = serving_model.load(source, "1", int8).info
    assert checked["variant"] == "int8" and checked["golden"]["status"] == "passed"
    assert checked["golden"]["boxes"]["golden"] > 0 and checked["golden"]["iou"] == 0.5
    # quantize shipped it under the same check, on the same golden images
    shipped = json.loads(paths.QUANTIZE_REPORT.read_text())["golden_box_agreement"]
    assert shipped == pytest.approx(checked["golden"]["box_agreement"], abs=1e-3)
    # golden boxes grown by one anchor size a side: IoU under 0.5 for most, refused
    decoder = serving_model._decoder(session.get_modelmeta().custom_metadata_map)
    grown = golden | {"bbox_regression": golden["bbox_regression"] + 1.0}
    with pytest.raises(serving_model.Refused, match="serve.int8_min_agreement"):
        serving_model.check_golden_boxes(session, grown, decoder, int8)
    # the same boxes, each under the next class: only those with a partner of the other
    # class at the same place still agree (this weak detector has many), refused
    relabelled = golden | {"cls_logits": np.roll(golden["cls_logits"], 1, axis=-1)}
    with pytest.raises(serving_model.Refused, match="serve.int8_min_agreement"):
        serving_model.check_golden_boxes(session, relabelled, decoder, int8)


def assert_quantize_refuses_what_serving_would(cfg) -> None:
    """Golden boxes moved (as above): quantize does not ship the int8 detector, and says so in
    serving's terms."""
    saved = paths.GOLDEN.read_bytes()
    with np.load(paths.GOLDEN) as golden:
        moved = dict(golden) | {"bbox_regression": golden["bbox_regression"] + 1.0}
    with paths.GOLDEN.open("wb") as file:
        np.savez(file, **moved)
    try:
        refused = detection_quantize.run(cfg)
    finally:
        paths.GOLDEN.write_bytes(saved)
    assert not refused.shipped
    assert [r for r in refused.reasons if "lensflow serve --int8 would refuse it" in r]


def assert_evaluation_figures(client) -> None:
    """evaluate: the misdetection counts in its report, both figures in its MLflow run."""
    report = json.loads(paths.EVALUATION_REPORT.read_text())
    errors = report["misdetections"]
    assert errors["score"] == 0.5 and errors["iou"] == 0.5
    assert errors["missed"] + errors["false_positives"] >= errors["images_with_errors"] > 0
    run = mlflow.search_runs(
        experiment_names=[TINY_DETECTION["tracking"]["experiment"]],
        filter_string="tags.`lensflow.step` = 'evaluate'",
        output_format="list",
    )[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert logged == {"plots/detection_pr_curves.png", "plots/misclassified.png"}
    assert run.data.metrics["test/map"] == pytest.approx(report["map"])
    for figure in (evaluate.PR_CURVES, evaluate.MISDETECTIONS):
        assert Image.open(figure).size[0] > 300


def assert_monitoring_box_statistics(cfg, tmp_path) -> None:
    """The @champion's box statistics (its reference profile, logged at register) against a
    batch of fresh shapes (no alert) and one of the same backgrounds without shapes: an alert
    on the box checks, exit 1."""
    synthetic.write(tmp_path / "fresh", 24, 32, seed=1234)  # a seed the detector never saw
    few = config.with_values(cfg, {"monitor.permutations": 100})  # raised for every test
    clean = monitor.run(few, str(tmp_path / "fresh/images"))
    assert not clean["alert"], clean["checks"]
    tested = {c["name"] for c in clean["checks"]}
    watched = {*monitor.BOX_SIGNALS, "class_prior", "brightness", "embedding_mmd"}
    assert tested >= watched and not clean["skipped"] and not clean["skipped_reasons"]
    p_valued = [c for c in clean["checks"] if "test" in c]  # one Bonferroni threshold
    assert clean["n_tests"] == len(p_valued) == len(tested) - 2  # + data, usable images
    threshold = cfg.monitor.false_alarm_rate / len(p_valued)
    assert {c["threshold"] for c in p_valued} == {threshold}
    assert clean["permutations"]["used"] == math.ceil(drift.FLOOR_MARGIN / threshold) - 1
    rng = np.random.default_rng(5)
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(24):
        Image.fromarray(synthetic._texture(rng, 32)).save(empty / f"{i:02d}.png")
    assert cli.main(["monitor", "--data", str(empty)]) == 1
    shifted = json.loads(paths.MONITORING_REPORT.read_text())
    assert shifted["task"] == "detection" and shifted["model"]["version"] == "1"
    fired = set(shifted["fired"])  # which box statistic moves most depends on the CPU's training
    assert "embedding_mmd" in fired and fired & set(monitor.BOX_SIGNALS), shifted["checks"]
    assert shifted["boxes"]["reference"]["box_count"] > 0
    assert_old_graph_skips_embeddings(cfg, tmp_path / "fresh/images")


def assert_old_graph_skips_embeddings(cfg, fresh) -> None:
    """A detector exported before the `embeddings` output (the registered graph without it):
    served, its golden check passed on golden outputs without embeddings, and monitored
    without `embedding_mmd`, skipped with its reason."""
    import onnx

    from components.detection import model

    onnx_bytes, golden, _ = serving_model._download(NAME, "1", want_int8=False)
    assert golden["embeddings"].shape[0] == len(golden["images"])
    proto = onnx.load_from_string(onnx_bytes)
    kept = [o for o in proto.graph.output if o.name != "embeddings"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    old = fresh.parent.parent / "old.onnx"
    old.write_bytes(proto.SerializeToString())
    served = serving_model.load(serving_model.parse(str(old)), None, cfg.serve)
    assert served.info["task"] == "detection" and len(served.predict(golden["images"])[0]["boxes"])
    session, meta = served.session, served.session.get_modelmeta().custom_metadata_map
    old_golden = {name: value for name, value in golden.items() if name != "embeddings"}
    assert serving_model.check_golden_outputs(session, old_golden, cfg.serve)["status"] == "passed"
    _, reference, pca = monitor.load_profile(f"models:/{NAME}/1")
    images = golden["images"]
    values, _ = monitor.signals(session, model.decoder_from_metadata(meta), images, [32] * 4,
                                [32] * 4, pca)  # fmt: skip
    tested, skipped, _ = monitor.checks(reference, values, 3, cfg)
    assert skipped == {"embedding_mmd": monitor.NO_EMBEDDINGS}
    assert "embedding_mmd" not in {c["name"] for c in tested}
