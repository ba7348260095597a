"""monitor, for `task: detection`: one continuous-validation pass of a registered detector on a
new batch of images, by its box statistics and its images' properties.

The reference profile (`write_profile`, made when register logs the detector, from the
registered graph and the decoder its metadata rebuilds, so exactly what the monitor runs
later): per image of the test split (at most `monitor.reference_images`, a seeded sample),
the detector's own outputs after its score threshold and NMS: `box_count` (boxes per image),
`box_size` (the median over the image's boxes of sqrt(box area) / image side), `box_score`
(the mean score of its boxes) and `box_class` (the class of its best box), plus the image
properties classification watches (brightness, contrast, sharpness, file size and aspect,
channel means and stds: `components.drift.drift.image_properties`), and the graph's
`embeddings` (the neck's three stage levels, pooled: `model.Heads`) reduced as a classifier's
are (`components.drift.profile`): projected on a PCA (`monitor.pca_components`) fitted on a
seeded sample of the training split, each component scaled to unit variance there; with the
median-heuristic bandwidth of the reference's reduced embeddings. One file,
models/detection_profile.npz (arrays and a JSON header), logged as
`profile/detection_profile.npz` in the register run.

The pass (`run`): the batch (a flat folder of images) through the training data's gate, as
for a classifier (`components.monitoring.monitor_data`), then one two-sample KS test per
scalar signal, a permutation chi-square test of `box_class` (`class_prior`) and the MMD
permutation test of the reduced embeddings (`embedding_mmd`, a classifier's), all under one
Bonferroni threshold (`monitor.false_alarm_rate` / number of tests), the alert, report,
MLflow run and webhook of `components.monitoring.monitor`. An image without boxes counts in
`box_count` and is left out of the others; a check with no value on either side is skipped
(`skipped`, its reason in `skipped_reasons`), and so is `embedding_mmd` for a detector exported
before its graph had the `embeddings` output. Every test is per image (not per box: an
image's boxes are not independent).
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
from components.drift import profile as embedding_profile
from components.monitoring import monitor, monitor_data
from components.release import registry

FORMAT = 1
PROFILE = paths.MODELS / "detection_profile.npz"
PROFILE_ARTIFACT = "profile/detection_profile.npz"
BOX_SIGNALS = ("box_count", "box_size", "box_score")
COLUMNS = ("path", "box_count", "box_size", "box_score", "box_class", "tails", "flagged")
TAIL = 0.025  # outside the reference's central 95 % of a signal: in its tail


NO_EMBEDDINGS = (
    "the graph has no `embeddings` output (exported before detection embeddings were "
    "monitored: export and register it again)"
)
NO_VALUES = "no value on the batch's side or the reference's (no image with a box)"


def detect(session, decode: model.Decoder, images: np.ndarray, batch: int = 64):
    """(the detector's boxes on uint8 images [N, 3, S, S], by ONNX Runtime then `decode`;
    its `embeddings` [N, D], None for a graph without that output)."""
    names = list(decode.outputs)
    embed = "embeddings" in {output.name for output in session.get_outputs()}
    found, embeddings = [], []
    for rows in prepared.chunks(len(images), batch):
        chunk = np.ascontiguousarray(images[rows])
        outputs = session.run(names + ["embeddings"] * embed, {"images": chunk})
        found += decode(*outputs[: len(names)], [chunk.shape[-2:]] * len(chunk))
        embeddings += outputs[len(names) :]
    return found, np.concatenate(embeddings) if embeddings else None


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


def signals(session, decode, images: np.ndarray, widths, heights, pca=None):
    """(every signal the checks compare, the detections), the same way for both sides;
    `embeddings` reduced by `pca` (a `components.drift.profile.Profile`'s PCA) where both the
    graph and the profile have them."""
    found, embeddings = detect(session, decode, images)
    values = drift.image_properties(images, widths, heights)
    values |= box_statistics(found, images.shape[-1])
    if pca is not None and embeddings is not None:
        values["embeddings"] = embedding_profile.reduce(pca, embeddings)
    return values, found


def fit_pca(cfg: Config, session, decode) -> embedding_profile.Profile | None:
    """The embeddings' PCA, fitted on a seeded sample of the training split (None for a
    graph without embeddings); a `Profile` holding only it, which `reduce` takes."""
    images = np.load(paths.shard_images("train"), mmap_mode="r")
    rows = prepared.sample(len(images), embedding_profile.TRAIN_SAMPLE, cfg.seed)
    _, embeddings = detect(session, decode, np.asarray(images[rows]))
    if embeddings is None or len(embeddings) < 2:
        return None
    pca = embedding_profile.fit_pca(embeddings, cfg.monitor.pca_components)
    return embedding_profile.Profile({}, {}, *pca, None)


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
    session = ort_session(onnx_bytes)
    pca = fit_pca(cfg, session, decode)
    reference, _ = signals(session, decode, sample, widths, heights, pca)
    header = {
        "format": FORMAT,
        "task": "detection",
        "reference_split": "test",
        "n_reference": len(rows),
        "score_threshold": cfg.detection.score_threshold,
    }
    arrays = {"meta": np.array(json.dumps(header))}
    arrays |= {f"reference.{name}": values for name, values in reference.items()}
    if "embeddings" in reference:
        bandwidth = drift.median_bandwidth(reference["embeddings"], seed=cfg.seed)
        arrays |= {"reference.bandwidth": np.array(bandwidth), "pca.mean": pca.pca_mean,
                   "pca.components": pca.pca_components, "pca.scale": pca.pca_scale}  # fmt: skip
    PROFILE.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic(PROFILE) as partial:
        np.savez(partial, **arrays)
    return PROFILE


def load_profile(model_uri: str) -> tuple[dict, dict, embedding_profile.Profile | None]:
    """(header, reference signals, the embeddings' PCA or None: a profile made before the
    graph had embeddings) of a registered detector's profile."""
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
            reference = {
                k.removeprefix("reference."): arrays[k] for k in arrays if k.startswith("refer")
            }
            pca = None
            if "pca.mean" in arrays:
                parts = [arrays[f"pca.{k}"] for k in ("mean", "components", "scale")]
                pca = embedding_profile.Profile({}, {}, *parts, None)
    if header.get("format") != FORMAT:
        raise UserError(f"{model_uri}: profile format {header.get('format')}, expected {FORMAT}")
    return header, reference, pca


def checks(reference: dict, batch: dict, classes: int, cfg: Config) -> tuple[list, dict, dict]:
    """(the p-valued checks, {check skipped: why}, the permutations)."""
    scalar = [k for k in batch if k not in ("box_class", "embeddings") and k in reference]
    testable = [k for k in scalar if len(batch[k]) and len(reference[k])]
    prior = bool(len(batch["box_class"]) and len(reference.get("box_class", ())))
    embedded = "embeddings" in batch and "embeddings" in reference
    skipped = dict.fromkeys(sorted(set(scalar) - set(testable)), NO_VALUES)
    skipped |= {} if prior else {"class_prior": NO_VALUES}
    skipped |= {} if embedded else {"embedding_mmd": NO_EMBEDDINGS}
    n_tests = len(testable) + prior + embedded
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
    if embedded:
        statistic, p_value = drift.mmd_permutation(
            batch["embeddings"],
            reference["embeddings"],
            float(reference["bandwidth"]),
            used,
            cfg.seed,
        )
        tested.append(
            {"name": "embedding_mmd", "test": "mmd_permutation", "statistic": statistic,
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
    header, reference, pca = load_profile(model_uri)
    size = int(meta["image_size"])
    batch = monitor_data.read(cfg.model_copy(update={"task": "classification"}), data, [], 3, size)
    checked = [monitor.data_check(batch), monitor.usable_check(batch)]
    tested, skipped, permutations, values, found = [], {}, {"used": 0, "note": ""}, {}, []
    if len(batch.images):
        decode = model.decoder_from_metadata(meta)
        values, found = signals(session, decode, batch.images, batch.widths, batch.heights, pca)
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
        "skipped": list(skipped),
        "skipped_reasons": skipped,
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
