"""monitor, for `task: detection`: one continuous-validation pass of a registered detector on a
new batch of images, by its box statistics and its images' properties.

The reference profile (`write_profile`, made when register logs the detector, from the
registered graph and the decoder its metadata rebuilds, so exactly what the monitor runs
later): per image of the test split (at most `monitor.reference_images`, a seeded sample),
the detector's own outputs after its score threshold and NMS: `box_count` (boxes per image),
`box_size` (the median over the image's boxes of sqrt(box area) / image side), `box_score`
(the mean score of its boxes) and `box_class` (the class of its best box), plus the image
properties classification watches (brightness, contrast, sharpness, file size and aspect,
channel means and stds: `components.drift.drift.image_properties`). One file,
models/detection_profile.npz (arrays and a JSON header), logged as
`profile/detection_profile.npz` in the register run. No backbone embeddings: the exported
graph returns only the heads' outputs (`model.OUTPUTS` of its architecture).

The pass (`run`): the batch (a flat folder of images) through the training data's gate, as
for a classifier (`components.monitoring.monitor_data`), then one two-sample KS test per
scalar signal and a permutation chi-square test of `box_class` (`class_prior`), all under one
Bonferroni threshold (`monitor.false_alarm_rate` / number of tests), the alert, report,
MLflow run and webhook of `components.monitoring.monitor`. An image without boxes counts in
`box_count` and is left out of the others; a check with no value on either side is skipped
(`skipped`). Every test is per image (not per box: an image's boxes are not independent).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from components.core import paths, tracking
from components.core.config import Config
from components.core.errors import UserError
from components.data import prepared
from components.detection import model
from components.drift import drift
from components.monitoring import monitor, monitor_data
from components.release import registry

FORMAT = 1
PROFILE = paths.MODELS / "detection_profile.npz"
PROFILE_ARTIFACT = "profile/detection_profile.npz"
BOX_SIGNALS = ("box_count", "box_size", "box_score")
COLUMNS = ("path", "box_count", "box_size", "box_score", "box_class", "tails", "flagged")
TAIL = 0.025  # outside the reference's central 95 % of a signal: in its tail


def detect(session, decode: model.Decoder, images: np.ndarray, batch: int = 64) -> list[dict]:
    """The detector's boxes on uint8 images [N, 3, S, S], by ONNX Runtime then `decode`."""
    found = []
    for rows in prepared.chunks(len(images), batch):
        chunk = np.ascontiguousarray(images[rows])
        outputs = session.run(list(decode.outputs), {"images": chunk})
        found += decode(*outputs, [chunk.shape[-2:]] * len(chunk))
    return found


def box_statistics(found: list[dict], size: int) -> dict[str, np.ndarray]:
    """Per image, `box_count`; per image with a box, `box_size`, `box_score`, `box_class`."""
    count, sizes, scores, classes = [], [], [], []
    for out in found:
        count.append(len(out["boxes"]))
        if not len(out["boxes"]):
            continue
        boxes = np.asarray(out["boxes"], np.float64)
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
            boxes[:, 3] - boxes[:, 1], 0, None
        )
        sizes.append(float(np.median(np.sqrt(area))) / size)
        scores.append(float(np.mean(np.asarray(out["scores"]))))
        classes.append(int(np.asarray(out["labels"])[int(np.argmax(np.asarray(out["scores"])))]))
    return {
        "box_count": np.asarray(count, np.float64),
        "box_size": np.asarray(sizes, np.float64),
        "box_score": np.asarray(scores, np.float64),
        "box_class": np.asarray(classes, np.int64),
    }


def signals(session, decode, images: np.ndarray, widths, heights) -> tuple[dict, list[dict]]:
    """(every signal the checks compare, the detections), the same way for both sides."""
    found = detect(session, decode, images)
    values = drift.image_properties(images, widths, heights)
    return values | box_statistics(found, images.shape[-1]), found


def write_profile(cfg: Config, onnx_bytes: bytes, meta: dict) -> Path:
    """models/detection_profile.npz of the detector `onnx_bytes` with ONNX metadata `meta`."""
    import pandas as pd

    from components.scoring.backends import ort_session

    images = np.load(paths.shard_images("test"), mmap_mode="r")

    manifest = pd.read_parquet(paths.MANIFEST, columns=["split", "width", "height"])
    test = manifest[manifest["split"] == "test"]
    if len(images) < 2 or len(test) != len(images):
        raise UserError(f"the test split has {len(images)} images: a reference profile needs 2")
    rows = prepared.sample(len(images), cfg.monitor.reference_images, cfg.seed)
    sample = np.asarray(images[rows])
    widths, heights = test["width"].to_numpy()[rows], test["height"].to_numpy()[rows]
    decode = model.decoder_from_metadata(meta)
    reference, _ = signals(ort_session(onnx_bytes), decode, sample, widths, heights)
    header = {
        "format": FORMAT,
        "task": "detection",
        "reference_split": "test",
        "n_reference": len(rows),
        "score_threshold": cfg.detection.score_threshold,
    }
    arrays = {"meta": np.array(json.dumps(header))}
    arrays |= {f"reference.{name}": values for name, values in reference.items()}
    PROFILE.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic(PROFILE) as partial:
        np.savez(partial, **arrays)
    return PROFILE


def load_profile(model_uri: str) -> tuple[dict, dict]:
    """(header, reference signals) of a registered detector's profile."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = tracking.model_run_id(model_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="lensflow-profile-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=PROFILE_ARTIFACT, dst_path=tmp
            )
        except (MlflowException, OSError):
            raise UserError(
                f"{model_uri}: its run {run_id} has no {PROFILE_ARTIFACT} (registered before "
                "detection monitoring: run the pipeline again to register one)"
            ) from None
        with np.load(local, allow_pickle=False) as arrays:
            header = json.loads(str(arrays["meta"]))
            reference = {k.removeprefix("reference."): arrays[k] for k in arrays if k != "meta"}
    if header.get("format") != FORMAT:
        raise UserError(f"{model_uri}: profile format {header.get('format')}, expected {FORMAT}")
    return header, reference


def checks(reference: dict, batch: dict, classes: int, cfg: Config) -> tuple[list, list, dict]:
    """(the p-valued checks, the signals skipped for want of values, the permutations)."""
    scalar = [k for k in batch if k != "box_class" and k in reference]
    testable = [k for k in scalar if len(batch[k]) and len(reference[k])]
    prior = bool(len(batch["box_class"]) and len(reference.get("box_class", ())))
    skipped = sorted(set(scalar) - set(testable)) + ([] if prior else ["class_prior"])
    n_tests = len(testable) + prior
    used, note = drift.permutations_for(
        n_tests, cfg.monitor.false_alarm_rate, cfg.monitor.permutations
    )
    tested = []
    for name in testable:
        statistic, p_value = drift.ks(batch[name], reference[name])
        tested.append({"name": name, "test": "ks", "statistic": statistic, "p_value": p_value})
    if prior:
        statistic, p_value = drift.chi2_permutation(
            batch["box_class"], reference["box_class"], classes, used, cfg.seed
        )
        tested.append(
            {"name": "class_prior", "test": "chi2_permutation", "statistic": statistic,
             "p_value": p_value}
        )  # fmt: skip
    return tested, skipped, {"used": used, "note": note}


def run(cfg: Config, data: str | None = None, model_uri: str | None = None) -> dict:
    """One pass; returns the report (reports/monitoring.json's content)."""
    import mlflow

    data = data or cfg.monitor.data
    if not data:
        raise UserError("no batch to check: pass --data PATH or set monitor.data")
    root = Path(data).expanduser()
    if root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        raise UserError(f"{data}: a detection batch is a flat folder of images (no sub-folders)")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    model_uri = model_uri or registry.champion_uri(cfg.registry.model_name)
    session, meta = registry.load_onnx_session(model_uri)
    if meta.get("task") != "detection":
        raise UserError(f"{model_uri} is not a detector (task: detection monitors detectors)")
    header, reference = load_profile(model_uri)
    size = int(meta["image_size"])
    batch = monitor_data.read(cfg.model_copy(update={"task": "classification"}), data, [], 3, size)
    checked = [monitor.data_check(batch), monitor.usable_check(batch)]
    tested, skipped, permutations, values, found = [], [], {"used": 0, "note": ""}, {}, []
    if len(batch.images):
        decode = model.decoder_from_metadata(meta)
        values, found = signals(session, decode, batch.images, batch.widths, batch.heights)
        tested, skipped, permutations = checks(reference, values, len(meta["classes"]), cfg)
    checked += drift.bonferroni(tested, cfg.monitor.false_alarm_rate)
    table = _table(batch.files, found, size, reference, checked, meta["classes"])
    paths.write_csv(paths.MONITORING_IMAGES, table, list(COLUMNS))
    fired = [c["name"] for c in checked if not c["passed"]]
    report = {
        "task": "detection",
        "alert": bool(fired),
        "fired": fired,
        "checks": checked,
        "skipped": skipped,
        "false_alarm_rate": cfg.monitor.false_alarm_rate,
        "n_tests": len(tested),
        "permutations": permutations,
        "model": monitor.describe_model(model_uri),
        "batch": {
            "path": str(root.resolve()),
            "fingerprint": batch.fingerprint,
            "labelled": False,
            "n_files": batch.validation["n_images"],
            "n_images": len(batch.images),
            "images": str(paths.MONITORING_IMAGES),
            "n_flagged": sum(row["flagged"] for row in table),
        },
        "boxes": {"batch": _summary(values), "reference": _summary(reference)},
        "validation": monitor.validation_summary(batch.validation),
        "reference": {k: header[k] for k in ("reference_split", "n_reference", "score_threshold")},
    }
    report["webhook"] = monitor.alert_hook(report)
    paths.write_json(paths.MONITORING_VALIDATION, batch.validation)
    report["mlflow_run_id"] = monitor.log_run(cfg, report)
    paths.write_json(paths.MONITORING_REPORT, report)
    return report


def _summary(values: dict) -> dict:
    """Means of the box signals (null without values): what the report shows a reader."""
    return {
        name: round(float(np.mean(values[name])), 6) if len(values.get(name, ())) else None
        for name in BOX_SIGNALS
    }


def _table(files, found, size: int, reference: dict, checked: list, classes) -> list[dict]:
    """One row per usable image: its box statistics, the box signals for which it sits in the
    reference's tails, and `flagged` when one of those fired."""
    fired = {c["name"] for c in checked if not c["passed"]}
    bounds = {
        name: np.quantile(reference[name], [TAIL, 1 - TAIL])
        for name in BOX_SIGNALS
        if len(reference.get(name, ()))
    }
    rows = []
    for name, out in zip(files, found, strict=True):
        own = box_statistics([out], size)
        row = {"path": name}
        for signal in BOX_SIGNALS:
            row[signal] = round(float(own[signal][0]), 6) if len(own[signal]) else ""
        row["box_class"] = classes[int(own["box_class"][0])] if len(own["box_class"]) else ""
        tails = [
            signal
            for signal, (low, high) in bounds.items()
            if row[signal] != "" and not low <= row[signal] <= high
        ]
        rows.append({**row, "tails": ";".join(tails), "flagged": bool(set(tails) & fired)})
    return rows
