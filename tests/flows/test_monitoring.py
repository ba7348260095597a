"""Continuous validation on a tiny trained, exported and registered shapes model: batches of
fresh shapes (a seed the model never saw), clean and corrupted, labelled and not, against
real MLflow (sqlite) and a real Prefect API (the session's test harness)."""

from __future__ import annotations

import http.server
import json
import threading

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import yaml
from PIL import Image

from cli import main as cli
from components.core import config, paths
from components.data import datasets, prepare, validate
from components.drift import drift
from components.drift import profile as reference_profile
from components.evaluation import evaluate
from components.monitoring import monitor
from components.release import export, promote, registry
from components.training import train
from flows import retrain
from flows.retrain import TRAINING_DEPLOYMENT
from tests.conftest import tiny_project

PER_CLASS = 10  # 100 images a batch


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A tiny project whose exported model (with its reference profile) is @champion."""
    root = tmp_path_factory.mktemp("monitoring")
    with tiny_project(root) as mp:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["monitor"]["autoencoder_epochs"] = 3
        params["evaluate"]["robustness_images"] = 10
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        cfg = config.load("params.yaml")
        for step in (datasets.run, prepare.run, validate.run, train.run, evaluate.run, export.run):
            step(cfg)
        registry.run(cfg)
        assert promote.run(cfg).promoted
        yield {"root": root, "cfg": cfg, "mp": mp}


def write_batch(
    root,
    corruption=None,
    severity=0.0,
    labelled=True,
    seed=7,
    rotate=0,
    classes=None,
    per=PER_CLASS,
):
    """`per` fresh shapes of each class (of the first `classes`: a label shift), corrupted as a
    camera would; `rotate` files every image under another class's folder (wrong labels)."""
    from components.scoring import robustness

    rng = np.random.default_rng(seed)
    names = datasets.SHAPE_CLASSES
    for k, name in enumerate(names[:classes]):
        for i in range(per):
            image = datasets.shape_image(name, rng).transpose(2, 0, 1)[None]
            if corruption:
                image = robustness.corrupt(image, corruption, severity, rng)
            folder = root / names[(k + rotate) % len(names)] if labelled else root
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].transpose(1, 2, 0)).save(folder / f"{name}-{i:02d}.png")
    return root


def test_export_adds_embeddings_and_a_reference_profile_the_model_never_saw(champion):
    proto = onnx.load(champion["root"] / paths.ONNX)
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "embeddings"]
    parity = json.loads((champion["root"] / paths.EXPORT_REPORT).read_text())["onnx"]["parity"]
    assert parity["passed"] and parity["embeddings_max_abs_diff"] < 1e-4
    profile = reference_profile.load(champion["root"] / paths.PROFILE)
    half, held_out, test = reference_profile.test_halves(champion["cfg"].seed)
    assert len(half) >= 2 and len(held_out) >= 2 and len(half) + len(held_out) == len(test)
    assert profile.meta["reference_split"] == "test (reference half)"
    assert profile.meta["n_reference"] == len(half)
    assert profile.reference["embeddings"].shape == (len(half), 8)
    # its images: the test split's reference half, none trained or selected on
    images = np.load(champion["root"] / paths.shard_images("test"))
    brightness = drift.image_properties(images[half], [32] * len(half), [32] * len(half))
    assert np.allclose(np.sort(brightness["brightness"]), np.sort(profile.reference["brightness"]))
    assert not set(registry.trained_on()) & set(test["sha256"])  # lineage/trained_on.txt
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("lensflow-classifier", "champion")
    artifacts = [a.path for a in client.list_artifacts(version.run_id, "profile")]
    assert artifacts == ["profile/profile.npz"]


def test_a_clean_held_out_batch_raises_no_alert(champion, tmp_path):
    report = monitor.run(champion["cfg"], str(write_batch(tmp_path / "clean")))
    assert report["alert"] is False and report["fired"] == []
    names = [c["name"] for c in report["checks"]]
    assert {"data_validation", "accuracy", "brightness", "sharpness", "embedding_mmd"} <= set(names)
    assert {"class_prior", "confidence", "entropy", "reconstruction_error"} <= set(names)
    drift_checks = [c for c in report["checks"] if "test" in c]
    assert all(c["threshold"] == pytest.approx(0.05 / len(drift_checks)) for c in drift_checks)
    assert report["model"]["version"] == "1" and len(report["batch"]["fingerprint"]) == 64
    assert json.loads((champion["root"] / paths.MONITORING_REPORT).read_text()) == report
    table = pd.read_csv(champion["root"] / paths.MONITORING_IMAGES, keep_default_na=False)
    assert len(table) == report["batch"]["n_images"] and (table["label"] != "").all()
    assert ((table["margin"] >= 0) & (table["margin"] <= table["confidence"])).all()
    assert set(table["fed"].iloc[0].split(";")) == {c["name"] for c in drift_checks}
    assert not table["flagged"].any() and report["batch"]["n_flagged"] == 0  # nothing fired

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("lensflow-monitoring")
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.experiment_id == experiment.experiment_id
    assert run.data.metrics["alert"] == 0 and "embedding_mmd" in run.data.metrics
    assert run.data.tags["batch.fingerprint"] == report["batch"]["fingerprint"]


@pytest.mark.parametrize(
    "corruption, severity, expected",
    [("gaussian_noise", 64.0, "embedding_mmd"), ("gaussian_blur", 1.5, "sharpness"),
     ("brightness", -75.0, "brightness")],
)  # fmt: skip
def test_a_corrupted_batch_raises_an_alert_naming_the_check(
    champion, tmp_path, monkeypatch, corruption, severity, expected
):
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(monitor.WEBHOOK_ENV, f"http://127.0.0.1:{server.server_port}/hook")
    try:
        batch = write_batch(tmp_path / corruption, corruption, severity, labelled=False)
        report = monitor.run(champion["cfg"], str(batch))
    finally:
        server.shutdown()
    seen = {c["name"]: c["value"] for c in report["checks"]}
    assert report["alert"] and expected in report["fired"], (seen[expected], report["fired"])
    assert report["webhook"]["status"] == "sent" and received[0]["fired"] == report["fired"]
    table = pd.read_csv(paths.MONITORING_IMAGES, keep_default_na=False)
    flagged = table[table["flagged"]]  # the images in the tail of a check that fired
    assert report["batch"]["n_flagged"] == len(flagged) > 0
    assert all((batch / path).is_file() for path in table["path"])  # what review picks from
    tails = [set(t.split(";")) for t in flagged["tails"]]
    fired = set(report["fired"])
    if not fired & {"class_prior", "embedding_mmd"}:  # else low confidence flags one too
        assert all(tail & fired for tail in tails)
    if expected != "embedding_mmd":
        assert any(expected in tail for tail in tails)


def test_label_free_batch_runs_every_drift_check_and_no_accuracy_check(champion, tmp_path):
    report = monitor.run(champion["cfg"], str(write_batch(tmp_path / "flat", labelled=False)))
    names = {c["name"] for c in report["checks"]}
    assert not report["batch"]["labelled"] and report["batch"]["n_images"] == 100
    assert "accuracy" not in names and {"embedding_mmd", "class_prior"} <= names
    assert not report["alert"]


def test_a_label_shift_fires_the_class_prior_check_itself_at_a_strict_rate(champion, tmp_path):
    """Fresh shapes of two classes only, at false_alarm_rate 0.01 with 100 permutations asked
    (a p-value floor of 1/101, above 0.01 / 16): the count is raised, and class_prior fires."""
    strict = {"monitor.false_alarm_rate": 0.01, "monitor.permutations": 100}
    cfg = config.with_values(champion["cfg"], strict)
    batch = write_batch(tmp_path / "two", labelled=False, classes=2, per=25)
    report = monitor.run(cfg, str(batch))
    prior = next(c for c in report["checks"] if c["name"] == "class_prior")
    assert not prior["passed"] and prior["value"] < prior["threshold"] == 0.01 / report["n_tests"]
    assert 1 / (report["permutations"]["used"] + 1) < prior["threshold"]
    assert report["permutations"]["note"].startswith("monitor.permutations=100 raised to ")


def test_a_labelled_batch_where_the_champions_accuracy_falls(champion, tmp_path):
    report = monitor.run(champion["cfg"], str(write_batch(tmp_path / "wrong", rotate=1)))
    accuracy = next(c for c in report["checks"] if c["name"] == "accuracy")
    assert report["alert"] and report["fired"] == ["accuracy"]  # the images did not drift
    assert accuracy["value"] < 0.95 and accuracy["threshold"] == 0.95
    assert accuracy["test_accuracy"] == reference_profile.load(paths.PROFILE).meta["test_accuracy"]


def test_a_bad_file_is_reported_and_the_pass_goes_on(champion, tmp_path, monkeypatch):
    batch = write_batch(tmp_path / "bad", labelled=False)
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    monkeypatch.setenv(monitor.WEBHOOK_ENV, "http://127.0.0.1:9/nothing-listens-here")
    report = monitor.run(champion["cfg"], str(batch))
    assert report["fired"] == ["data_validation"] and report["batch"]["n_images"] == 100
    issue = next(i for i in report["validation"]["issues"] if i["path"] == "broken.png")
    assert issue["severity"] == "error"
    assert report["webhook"]["status"] == "failed"  # reported, not raised


def test_lensflow_monitor_exit_codes_artifact_and_retraining(champion, tmp_path, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    clean = str(write_batch(tmp_path / "clean"))
    assert cli.main(["monitor", "--data", clean]) == 0
    with get_client(sync_client=True) as client:  # the newest: other tests' passes share the key
        keys = ArtifactFilter(key=ArtifactFilterKey(any_=["continuous-validation"]))
        (artifact,) = client.read_artifacts(
            artifact_filter=keys, sort=ArtifactSort.CREATED_DESC, limit=1
        )
    assert "| embedding_mmd |" in artifact.data

    noisy = str(write_batch(tmp_path / "noisy", "gaussian_noise", 64.0, labelled=False))
    retrain = ["--set", "monitor.on_alert=retrain"]
    assert cli.main(["monitor", "--data", noisy, *retrain]) == 1
    assert f"no deployment {TRAINING_DEPLOYMENT}" in capsys.readouterr().err
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("lensflow-training")
        deployment_id = client.create_deployment(flow_id=flow_id, name="training")
    assert cli.main(["monitor", "--data", noisy, *retrain]) == 1
    started = json.loads(paths.MONITORING_REPORT.read_text())["retrain"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(started["flow_run_id"])
    assert started["status"] == "started" and run.deployment_id == deployment_id
    _the_retrain_guard(tmp_path, noisy, started["flow_run_id"])

    capsys.readouterr()
    assert cli.main(["monitor", "--data", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("missing: batch folder not found (expected a folder of images)")


def test_a_batch_with_no_usable_image_fails_the_usable_images_check(champion, tmp_path):
    batch = tmp_path / "unusable"
    batch.mkdir()
    for name in ("a.png", "b.jpg"):
        (batch / name).write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    report = monitor.run(champion["cfg"], str(batch))
    usable = next(c for c in report["checks"] if c["name"] == "usable_images")
    assert usable == {"name": "usable_images", "value": 0, "threshold": 1, "passed": False}
    assert report["alert"] and "usable_images" in report["fired"]
    assert report["n_tests"] == 0  # nothing to compare with the reference


def _worse_version(cfg) -> str:
    """Another version of the champion's model whose ONNX head favours class 0 by 8 logits
    (it predicts class 0 nearly always); the project's files are restored afterwards."""
    import torch

    originals = {p: p.read_bytes() for p in (paths.CHECKPOINT, paths.ONNX)}
    try:
        checkpoint = torch.load(paths.CHECKPOINT, weights_only=True)
        bias = next(k for k in checkpoint["state_dict"] if k.endswith("head.bias"))
        checkpoint["state_dict"][bias][0] += 1e-6  # another checkpoint: another version
        torch.save(checkpoint, paths.CHECKPOINT)
        model = onnx.load(paths.ONNX)
        head = [t for t in model.graph.initializer if list(t.dims) == [10]][-1]
        values = onnx.numpy_helper.to_array(head).copy()
        values[0] += 8.0
        head.CopyFrom(onnx.numpy_helper.from_array(values, head.name))
        onnx.save(model, paths.ONNX)
        return registry.run(cfg).version
    finally:
        for path, content in originals.items():
            path.write_bytes(content)


def test_a_better_challenger_is_found_by_the_challenger_vs_champion_check(champion, tmp_path):
    cfg, name = champion["cfg"], champion["cfg"].registry.model_name
    worse = _worse_version(cfg)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "challenger", "1")  # the good model
    try:
        batch = str(write_batch(tmp_path / "labelled"))
        report = monitor.run(cfg, batch, model=f"models:/{name}/{worse}")
        check = next(c for c in report["checks"] if c["name"] == "challenger_vs_champion")
        assert check["statistic"] > 0.3 and check["value"] < check["threshold"]
        assert "challenger_vs_champion" in report["fired"]

        same = monitor.run(cfg, batch)  # the champion against itself as challenger
        check = next(c for c in same["checks"] if c["name"] == "challenger_vs_champion")
        assert (check["statistic"], check["value"], check["passed"]) == (0.0, 1.0, True)
        assert same["n_tests"] == report["n_tests"]  # both count the challenger's test
    finally:
        client.delete_registered_model_alias(name, "challenger")


def _the_retrain_guard(tmp_path, noisy: str, first_run: str) -> None:
    """After an alert on `noisy` started `first_run` (still scheduled: no worker runs it)."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    on_alert = ["--set", "monitor.on_alert=retrain"]

    def skipped(batch: str, *values: str) -> dict:
        assert cli.main(["monitor", "--data", batch, *on_alert, *values]) == 1
        outcome = json.loads(paths.MONITORING_REPORT.read_text())["retrain"]
        assert outcome["status"] == "skipped" and outcome["at"], outcome
        return outcome

    def finish(flow_run_id: str) -> None:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Completed(), force=True)

    for _ in range(2):  # the same drifted batch, monitored twice more
        again = skipped(noisy)
        assert again["flow_run_id"] == first_run and "this batch already started" in again["reason"]
    blurred = str(write_batch(tmp_path / "blurred", "gaussian_blur", 1.5, labelled=False))
    busy = skipped(blurred)
    assert busy["flow_run_id"] == first_run and "in progress (one at a time)" in busy["reason"]
    finish(first_run)
    cooling = skipped(blurred)
    assert "cool-down" in cooling["reason"]
    assert "monitor.retrain_cooldown_s = 3600" in cooling["reason"]
    no_cooldown = ["--set", "monitor.retrain_cooldown_s=0"]
    assert cli.main(["monitor", "--data", blurred, *on_alert, *no_cooldown]) == 1
    second = json.loads(paths.MONITORING_REPORT.read_text())["retrain"]
    assert second["status"] == "started" and second["flow_run_id"] != first_run
    finish(second["flow_run_id"])

    # two alerts on one new batch at the same moment: one training run
    cfg = config.with_values(config.load("params.yaml"), {"monitor.retrain_cooldown_s": 0})
    outcomes, log = [None, None], logging.getLogger("test")
    threads = [
        threading.Thread(target=lambda i=i: outcomes.__setitem__(
            i, retrain.start_training(cfg, "f" * 64, log)
        ))
        for i in range(2)
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o["status"] for o in outcomes) == ["skipped", "started"], outcomes
    assert outcomes[0]["flow_run_id"] == outcomes[1]["flow_run_id"]
