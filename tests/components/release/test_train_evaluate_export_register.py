"""The chain train -> evaluate -> export -> register on tiny real data, against real MLflow."""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from components.core import config, paths
from components.core.errors import GateFailed, UserError
from components.core.params_pipeline import Export, Quantize
from components.data import datasets, prepared
from components.evaluation import evaluate_model
from components.release import export, quantize, registry, tensorrt
from components.scoring import backends, robustness
from components.scoring.metrics import score
from components.training import doctor, loop, models, train
from tests.components.conftest import trained_copy
from tests.conftest import REPO, tiny_project


@pytest.fixture(scope="module")
def trained(trained_template, tmp_path_factory):
    """A prepared + trained + exported tiny project, shared by the tests of this module."""
    root = trained_copy(trained_template, tmp_path_factory, "project")
    with tiny_project(root) as mp:
        yield {
            "root": root,
            "cfg": config.load("params.yaml"),
            "train": trained_template["train"],
            "evaluation": trained_template["evaluation"],
            "export": trained_template["export"],
            "mp": mp,
        }


def test_checkpoint_is_a_weights_only_state_dict(trained):
    checkpoint = torch.load(trained["root"] / paths.CHECKPOINT, weights_only=True)
    assert set(checkpoint) == {"spec", "state_dict"}
    assert checkpoint["spec"]["classes"] == sorted(datasets.SHAPE_CLASSES)
    model, _ = models.load_checkpoint(trained["root"] / paths.CHECKPOINT)
    assert model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 10)


def test_training_learns_and_logs_each_epoch(trained):
    report = json.loads((trained["root"] / paths.TRAINING_REPORT).read_text())
    curve = pd.read_csv(trained["root"] / paths.TRAINING_CURVE, float_precision="round_trip")
    assert report["epochs_run"] == len(curve) == 8
    # every epoch lowers the training loss, and the kept epoch is the best on validation
    assert curve["train_loss"].is_monotonic_decreasing and curve["train_loss"].is_unique
    best = curve.loc[curve["val_loss"].idxmin()]
    assert (report["best_epoch"], report["best_val_loss"]) == (best["epoch"], best["val_loss"])
    assert trained["train"].best_val_accuracy == best["val_accuracy"]
    assert best["val_loss"] < 0.65 * math.log(10)  # 10 classes: ln(10) untrained
    assert best["val_accuracy"] >= 0.6  # chance is 0.1; 0.64 on CPU with TINY
    client = mlflow.MlflowClient()
    run = client.search_runs(
        client.get_experiment_by_name("lensflow").experiment_id, "tags.`lensflow.step` = 'train'"
    )[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == list(
        range(1, 9)
    )
    assert {"git.commit", "data.md5", "params.hash"} <= set(run.data.tags)


def test_augmentation_preview_shows_every_class(trained):
    _, labels = prepared.load_split("train")  # one class after another
    shown = labels[train.preview_indices(labels)].tolist()
    assert len(shown) == 16 and set(shown) == set(range(10))


def test_initial_loss_is_near_ln_classes(trained):
    """The untrained model's loss is ~ln(10): the classic sanity check of a fresh classifier."""
    report = json.loads((trained["root"] / paths.TRAINING_REPORT).read_text())
    assert report["expected_initial_loss"] == pytest.approx(math.log(10))
    assert report["initial_loss_ok"] and abs(report["initial_loss"] - math.log(10)) < 0.5

    spec = models.model_spec(trained["cfg"].model, prepared.load_meta())
    model = models.build(spec)
    with torch.no_grad():
        model.network.head.bias[0] = 20.0  # a head that is sure of class 0 before training
    images, labels = prepared.load_split("val")
    with pytest.warns(UserWarning, match="initial loss"):
        assert not doctor.initial_loss_check(model, images, labels, 10)["ok"]


def test_doctor_overfits_one_batch(trained):
    result = doctor.run(trained["cfg"], batch_size=16, steps=60)
    assert result["passed"] and result["accuracy"] == 1.0 and result["batch_size"] == 16


def test_a_nan_loss_stops_training_and_keeps_the_last_good_epoch(trained):
    class NanAfter(torch.nn.Module):
        """The real network, whose logits turn to NaN after `calls` training forwards."""

        def __init__(self, network, calls):
            super().__init__()
            self.network, self.calls = network, calls

        def forward(self, images):
            logits = self.network(images)
            if self.training:
                self.calls -= 1
                if self.calls < 0:
                    return logits * float("nan")
            return logits

    cfg = trained["cfg"]
    spec = models.model_spec(cfg.model, prepared.load_meta())
    steps_per_epoch = math.ceil(len(prepared.load_split("train")[0]) / cfg.train.batch_size)
    model = models.build(spec)
    model.network = NanAfter(model.network, calls=2 * steps_per_epoch + 1)
    with mlflow.start_run():
        best, history, _, diverged = loop.fit(
            model, cfg, prepared.load_split("train"), prepared.load_split("val")
        )
    assert "epoch 3" in diverged and len(history) == 2 and best["epoch"] in (1, 2)
    assert all(
        torch.isfinite(v).all() for v in best["state_dict"].values() if v.is_floating_point()
    )


def test_an_infinite_learning_rate_fails_with_a_clear_message(trained):
    cfg = trained["cfg"]
    broken = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": float("inf")})})
    checkpoint = trained["root"] / paths.CHECKPOINT
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with pytest.raises(GateFailed, match="training loss became nan"):
        train.run(broken)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before  # untouched


def test_evaluation_report_has_the_documented_keys(trained):
    report = json.loads((trained["root"] / paths.EVALUATION_REPORT).read_text())
    assert {
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "n_images",
        "per_class",
        "confusion_matrix",
    } <= set(report)
    assert np.array(report["confusion_matrix"]).sum() == report["n_images"]
    assert report["corruption_images"] == report["n_images"]  # fewer than robustness_images
    assert (trained["root"] / "plots" / "confusion_matrix.png").stat().st_size > 1000


def test_robustness_scores_a_seeded_sample_a_batch_at_a_time(trained):
    images, labels = prepared.load_split("test")
    sample = prepared.sample(len(images), 20, seed=1)
    assert len(sample) == 20 and list(sample) == sorted(set(sample))
    assert np.array_equal(sample, prepared.sample(len(images), 20, seed=1))
    model, _ = models.load_checkpoint(trained["root"] / paths.CHECKPOINT)
    predict, batches = backends.torch_predictor(model), []

    def counting(batch):
        batches.append(len(batch))
        return predict(batch)

    sampled = robustness.corruption_accuracy(counting, images, labels, sample, 0, batch_size=8)
    assert sum(batches) == 20 * 12 and max(batches) == 8  # 4 corruptions x 3 severities
    alone = robustness.corruption_accuracy(
        predict, images[sample], labels[sample], np.arange(20), 0, batch_size=8
    )
    assert sampled == alone  # the sample's accuracy, as if it were the whole test split


def test_onnx_export_has_preprocessing_metadata_and_parity(trained):
    proto = onnx.load(trained["root"] / paths.ONNX)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == sorted(datasets.SHAPE_CLASSES)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "embeddings"]
    assert trained["export"].top1_agreement == 1.0 and trained["export"].max_abs_diff < 1e-4
    assert trained["export"].accuracy == trained["evaluation"].accuracy
    # any image size and batch size: the graph resizes inside
    session = backends.ort_session(trained["root"] / paths.ONNX)
    out = session.run(["probabilities"], {"images": np.zeros((3, 3, 40, 24), np.uint8)})[0]
    assert out.shape == (3, 10) and np.allclose(out.sum(1), 1, atol=1e-5)


def test_parity_gate_catches_a_broken_export(trained, tmp_path):
    proto = onnx.load(trained["root"] / paths.ONNX)
    weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    array = onnx.numpy_helper.to_array(weight).copy()
    weight.CopyFrom(onnx.numpy_helper.from_array(array * 0.5, weight.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, broken)
    model, _ = models.load_checkpoint(trained["root"] / paths.CHECKPOINT)
    images, _ = prepared.load_split("test")
    parity = export.check_parity(model, broken, images, atol=1e-4)
    assert not parity["passed"] and parity["max_abs_diff"] > 1e-4


def test_export_run_fails_the_flow_when_parity_fails(trained):
    cfg = trained["cfg"].model_copy(update={"export": Export(parity_atol=1e-12)})
    with pytest.raises(GateFailed, match="parity"):
        export.run(cfg)
    assert (
        json.loads((trained["root"] / paths.EXPORT_REPORT).read_text())["onnx"]["status"]
        == "failed"
    )
    export.run(trained["cfg"])  # restore a passing export for the registry tests


def test_register_records_lineage_and_reuses_the_version_of_a_checkpoint(trained):
    cfg = trained["cfg"]
    name = cfg.registry.model_name
    first = registry.run(cfg)
    again = registry.run(cfg)  # a rerun on the same checkpoint (dvc repro --force)
    assert (first.reused, again.reused) == (False, True) and again.version == first.version
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    with pytest.raises(mlflow.exceptions.MlflowException):  # registering decides nothing
        client.get_model_version_by_alias(name, "champion")

    version = client.get_model_version(name, first.version)
    training = json.loads((trained["root"] / paths.TRAINING_REPORT).read_text())
    assert version.tags["lensflow.train_run_id"] == training["mlflow_run_id"]
    assert json.loads(version.tags["lensflow.export_parity"])["passed"] is True
    assert (
        version.tags["lensflow.checkpoint_sha256"]
        == hashlib.sha256((trained["root"] / paths.CHECKPOINT).read_bytes()).hexdigest()
    )
    assert version.tags["data.md5"] != ""
    session, meta = registry.load_onnx_session(f"models:/{name}/{first.version}")
    images, labels = prepared.load_split("test")
    metrics, _ = score(backends.onnx_predictor(session), images, labels, meta["classes"])
    assert metrics["accuracy"] == trained["evaluation"].accuracy


def test_quantization_gate_ships_and_refuses_by_its_thresholds(trained):
    cfg = trained["cfg"]
    lenient = cfg.model_copy(update={"quantize": Quantize(min_speedup=0.01, max_drop=100)})
    shipped = quantize.run(lenient)
    report = json.loads((trained["root"] / paths.QUANTIZE_REPORT).read_text())
    assert shipped.shipped and report["status"] == "shipped" and report["reasons"] == []
    assert report["formats"]["int8"]["size_bytes"] < report["formats"]["fp32"]["size_bytes"]
    assert report["formats"]["fp32"]["accuracy"] == trained["export"].accuracy
    assert report["calibration_images"] == min(300, len(prepared.load_split("train")[0]))
    assert len(report["excluded_nodes"]) == 1  # the classifier head stays in float
    unavailable = tensorrt.unavailable_reason()
    if unavailable:  # this machine: no tensorrt package or no CUDA GPU, and the report says so
        assert report["tensorrt_int8"] == {"status": "skipped", "reason": unavailable}
    else:
        engine = report["tensorrt_int8"]
        assert engine["status"] == "ok" and engine["precision"] == "int8"
        assert abs(engine["accuracy"] - report["formats"]["int8"]["accuracy"]) <= 0.02
        assert (trained["root"] / paths.PLAN_INT8).stat().st_size == engine["size_bytes"]

    # another registered model: this checkpoint's version under the default name exists already
    int8_cfg = config.with_values(cfg, {"registry.model_name": "lensflow-int8"})
    registered = registry.run(int8_cfg)
    client = mlflow.MlflowClient()
    version = client.get_model_version("lensflow-int8", registered.version)
    assert version.tags["lensflow.int8"] == "shipped"
    artifacts = [a.path for a in client.list_artifacts(version.run_id, "int8")]
    assert artifacts == ["int8/model.int8.onnx"]
    assert "## Formats" in version.description and "int8 ONNX (shipped" in version.description

    slow = cfg.model_copy(update={"quantize": Quantize(min_speedup=1000)})
    refused = quantize.run(slow)
    assert not refused.shipped and "min_speedup" in refused.reasons[0]
    exact = cfg.model_copy(update={"quantize": Quantize(min_speedup=0.01, max_drop=0)})
    result = quantize.run(exact)
    assert result.shipped == (result.accuracy_drop_points <= 0)
    assert_int8_ships_only_if_serving_accepts_it(trained, lenient)


def assert_int8_ships_only_if_serving_accepts_it(trained, lenient) -> None:
    """quantize's golden agreement is the one `lensflow serve --int8` checks; an int8 model
    serving would refuse (its golden classes moved, here) does not ship."""
    from serving.model import Refused, check_golden

    golden = trained["root"] / paths.GOLDEN
    with np.load(golden) as saved:
        kept = {"images": saved["images"], "probabilities": saved["probabilities"]}
    int8 = backends.ort_session(trained["root"] / paths.ONNX_INT8)
    report = json.loads((trained["root"] / paths.QUANTIZE_REPORT).read_text())
    any_agreement = lenient.serve.model_copy(update={"int8_min_agreement": 0.0})
    served = check_golden(int8, kept, "int8", any_agreement)
    assert report["golden_top1_agreement"] == round(served["top1_agreement"], 3)
    moved = {**kept, "probabilities": np.roll(kept["probabilities"], 1, axis=1)}
    try:
        np.savez(golden, **moved)
        refused = quantize.run(lenient)
    finally:
        np.savez(golden, **kept)
    assert not refused.shipped and re.fullmatch(
        r"top-1 agreement with the golden classes 0\.\d+ < serve\.int8_min_agreement 0\.9 "
        r"\(lensflow serve --int8 would refuse it\)",
        refused.reasons[0],
    ), refused.reasons
    with pytest.raises(Refused, match="int8_min_agreement"):
        check_golden(int8, moved, "int8", lenient.serve)


def test_golden_preprocessing_pins_image_to_tensor():
    """A fixed synthetic image -> the exact uint8 tensor the model sees (prepare and serving)."""
    from components.data.preprocess import resize_uint8

    image = datasets.shape_image("circle_large", np.random.default_rng(0))
    tensor = resize_uint8(torch.from_numpy(image).permute(2, 0, 1)[None], 16)
    assert int(image.sum()) == 261630
    assert int(tensor.sum()) == 65398
    assert tensor[0, :, 8, 8].tolist() == [140, 217, 228]
    assert tensor[0, :, 0, 0].tolist() == [16, 17, 21]


def test_golden_files_to_predictions_match_the_evaluation(trained, tmp_path):
    """Test files read as a user's folder give the evaluated tensors and predictions."""
    import shutil

    import pandas as pd

    manifest = pd.read_parquet(trained["root"] / paths.MANIFEST)
    raw = trained["root"] / "data/raw/shapes"
    for path in manifest.loc[manifest["split"] == "test", "path"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / path, tmp_path / path)
    classes = sorted(datasets.SHAPE_CLASSES)
    images, labels = evaluate_model.read_image_folder(tmp_path, classes, channels=3, size=16)
    shard_images, shard_labels = prepared.load_split("test")
    assert np.array_equal(images, shard_images)
    assert np.array_equal(labels, shard_labels)

    session = backends.ort_session(trained["root"] / paths.ONNX)
    predicted = backends.onnx_predictor(session)(images).argmax(1)
    rows = (trained["root"] / paths.PREDICTIONS).read_text().splitlines()[1:]
    assert [classes[p] for p in predicted] == [row.split(",")[1] for row in rows]


# `lensflow ARGS...`, SIGKILLed by itself at the start of training step argv[1] (1-based),
# the middle of an epoch: a kill that nothing in the process can catch or clean up after.
KILLED_AT_STEP = """
import os, signal, sys
from components.training import loop
real_step, steps = loop.Loop.step, []
def step(self, model, loss):
    steps.append(1)
    if len(steps) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, model, loss)
loop.Loop.step = step
from cli.main import main
sys.exit(main(sys.argv[2:]))
"""
# the random state resume must restore: augmentation, MixUp, shuffling, dropout
AUGMENTED = ["--set", "augment.preset=standard", "--set", "augment.flip=true"]
AUGMENTED += ["--set", "augment.mixup_alpha=0.2"]


def test_resume_after_a_sigkill_mid_epoch_ends_with_the_uninterrupted_weights(
    trained, tmp_path, monkeypatch
):
    project = tmp_path / "project"
    shutil.copytree(trained["root"], project)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }

    def lensflow(*args, script=None):
        command = ["-c", script, *args] if script else ["-m", "cli.main", *args]
        return subprocess.run(
            [sys.executable, *command], cwd=project, env=env, capture_output=True, text=True
        )

    done = lensflow("stage", "train", *AUGMENTED)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = torch.load(project / paths.CHECKPOINT, weights_only=True)["state_dict"]
    (project / paths.CHECKPOINT).unlink()

    steps_per_epoch = math.ceil(
        len(prepared.load_split("train")[1]) / trained["cfg"].train.batch_size
    )
    in_epoch_4 = 3 * steps_per_epoch + steps_per_epoch // 2 + 1
    killed = lensflow(str(in_epoch_4), "stage", "train", *AUGMENTED, script=KILLED_AT_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(project / paths.LAST_CHECKPOINT, weights_only=True)["epoch"] == 3
    assert not (project / paths.CHECKPOINT).exists()

    resumed = lensflow("stage", "train", "--resume", *AUGMENTED)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = torch.load(project / paths.CHECKPOINT, weights_only=True)["state_dict"]
    assert list(weights) == list(uninterrupted)
    assert [n for n, t in uninterrupted.items() if not torch.equal(t, weights[n])] == []

    monkeypatch.chdir(project)
    with pytest.raises(UserError, match="other params"):
        train.run(trained["cfg"].model_copy(update={"seed": 7}), resume=True)
