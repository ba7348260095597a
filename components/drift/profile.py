"""The reference profile of a model version, made at export: what its data looked like, so
continuous validation can tell when new images drift away from it.

The reference sample is images the model never saw: neither trained on (the training split)
nor selected on (the validation split, which picked the best checkpoint and on which the model
is more confident than on fresh images). It is the reference half of the test split (a seeded
hash of each image's content decides, as for the splits), at most monitor.reference_images of
it; the other half stays out of every reference, so false alarms can be measured on images
the model never saw that are not in the reference either (bench/drift_power.py). Per image:
the image properties (brightness, contrast, sharpness, size and aspect of the raw file, each
channel's mean and std), the model's confidence, entropy and predicted class, its
penultimate-layer embeddings (the ONNX `embeddings` output) reduced by a PCA fitted on training
images, and the reconstruction error of a small autoencoder trained on training images. One
file, models/profile.npz (numpy arrays and a JSON header, no pickles), which register logs
next to the model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import paths
from components.core.config import Config
from components.core.errors import UserError
from components.data import prepared
from components.drift import autoencoder, drift
from components.scoring.backends import ort_session

FORMAT = 1
REFERENCE_SPLIT = "test (reference half)"
TRAIN_SAMPLE = 2000  # training images that fit the PCA and the autoencoder (seeded sample)


@dataclass
class Profile:
    meta: dict
    reference: dict  # signal name -> per-image values of the reference sample; `bandwidth`
    pca_mean: np.ndarray
    pca_components: np.ndarray  # [k, embedding dims]
    pca_scale: np.ndarray  # [k]: each component's std on the training images
    autoencoder: autoencoder.AutoEncoder


def run(cfg: Config, test_accuracy: float, onnx_path: Path = paths.ONNX) -> dict:
    """Make models/profile.npz for the exported model; returns a summary for the report."""
    start = time.perf_counter()
    session = ort_session(onnx_path)
    meta = prepared.load_meta()
    train_images, _ = prepared.load_split("train")
    rows = prepared.sample(len(train_images), TRAIN_SAMPLE, cfg.seed)
    train_sample = np.asarray(train_images[rows])
    _, embeddings = model_outputs(session, train_sample)
    if embeddings is None:
        raise UserError(f"{onnx_path} has no `embeddings` output: export it again")
    mean, components, scale = fit_pca(embeddings, cfg.monitor.pca_components)
    model = autoencoder.train(train_sample, cfg.monitor.autoencoder_epochs, cfg.seed)
    del train_sample

    images, widths, heights = reference_sample(cfg.monitor.reference_images, cfg.seed)
    profile = Profile({}, {}, mean, components, scale, model)
    reference = signals(profile, session, images, widths, heights)
    reference["bandwidth"] = drift.median_bandwidth(reference["embeddings"], seed=cfg.seed)
    profile.reference = reference
    profile.meta = {
        "format": FORMAT,
        "classes": meta["classes"],
        "channels": meta["channels"],
        "image_size": meta["image_size"],
        "test_accuracy": test_accuracy,
        "reference_split": REFERENCE_SPLIT,
        "n_reference": len(images),
        "n_train": len(rows),
        "pca_components": len(components),
        "seconds": round(time.perf_counter() - start, 2),
    }
    save(profile, paths.PROFILE)
    return {"path": str(paths.PROFILE), **profile.meta}


def signals(profile: Profile, session, images: np.ndarray, widths, heights) -> dict:
    """Every per-image signal the drift checks compare, computed the same way for the
    reference and for a batch: uint8 images [N, C, S, S] as the model takes them, and the
    raw files' widths and heights."""
    probabilities, embeddings = model_outputs(session, images)
    confidence, entropy = drift.confidence_and_entropy(probabilities)
    found = drift.image_properties(images, widths, heights)
    found |= {
        "confidence": confidence,
        "entropy": entropy,
        "reconstruction_error": autoencoder.reconstruction_errors(profile.autoencoder, images),
        "predicted": probabilities.argmax(axis=1).astype(np.int64),
        "embeddings": None if embeddings is None else reduce(profile, embeddings),
    }
    return found


def model_outputs(session, images: np.ndarray, batch_size: int = 256):
    """(probabilities [N, K], embeddings [N, D] or None when the model has no such output)."""
    names = [o.name for o in session.get_outputs()]
    wanted = ["probabilities", "embeddings"] if "embeddings" in names else ["probabilities"]
    parts = [
        session.run(wanted, {"images": np.ascontiguousarray(images[part])})
        for part in prepared.chunks(len(images), batch_size)
    ]
    if not parts:
        return np.zeros((0, 0), np.float32), None
    outputs = [np.concatenate([p[i] for p in parts]) for i in range(len(wanted))]
    return outputs[0], outputs[1] if len(outputs) > 1 else None


def reduce(profile: Profile, embeddings: np.ndarray) -> np.ndarray:
    """Embeddings projected on the PCA components, each scaled to unit variance on training."""
    centred = np.asarray(embeddings, np.float64) - profile.pca_mean
    return centred @ profile.pca_components.T / profile.pca_scale


def fit_pca(embeddings: np.ndarray, components: int):
    x = np.asarray(embeddings, np.float64)
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(components, vt.shape[0], len(x) - 1))
    scale = singular[:k] / np.sqrt(max(1, len(x) - 1))
    return mean, vt[:k], np.maximum(scale, 1e-6)


def in_reference_half(sha256: str, seed: int) -> bool:
    """Whether a test-split image belongs to the half the reference profile samples from (a
    seeded hash of its content, independent of the one that chose its split)."""
    return hashlib.sha256(f"reference:{seed}:{sha256}".encode()).digest()[0] % 2 == 0


def test_halves(seed: int):
    """(the test split's rows in the reference half, the rows held out of every reference,
    the split's manifest rows), in the order of the test split's shard."""
    import pandas as pd

    manifest = pd.read_parquet(paths.MANIFEST, columns=["split", "sha256", "width", "height"])
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    half = test["sha256"].map(lambda sha: in_reference_half(sha, seed)).to_numpy(bool)
    return np.flatnonzero(half), np.flatnonzero(~half), test


def reference_sample(limit: int, seed: int):
    """A seeded sample of the test split's reference half: images, and the raw sizes the
    manifest holds."""
    images, _ = prepared.load_split("test")
    half, _, test = test_halves(seed)
    if len(test) != len(images) or len(half) < 2:
        raise UserError(
            f"the test split's reference half has {len(half)} images: the reference profile "
            "needs 2 or more (raise prepare.test_fraction or add images)"
        )
    rows = half[prepared.sample(len(half), limit, seed)]
    return (
        np.asarray(images[rows]),
        test["width"].to_numpy()[rows],
        test["height"].to_numpy()[rows],
    )


def save(profile: Profile, path: Path) -> None:
    arrays = {"meta": np.array(json.dumps(profile.meta))}
    for name, values in profile.reference.items():
        arrays[f"reference.{name}"] = np.asarray(values)
    arrays |= {
        "pca.mean": profile.pca_mean,
        "pca.components": profile.pca_components,
        "pca.scale": profile.pca_scale,
        **autoencoder.to_arrays(profile.autoencoder),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic(path) as partial:
        np.savez(partial, **arrays)


def load(path: Path | str) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: reference profile not found (run the export stage)")
    with np.load(path, allow_pickle=False) as arrays:
        meta = json.loads(str(arrays["meta"]))
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: profile format {meta.get('format')}, expected {FORMAT}")
        reference = {
            k.removeprefix("reference."): arrays[k] for k in arrays if k.startswith("reference.")
        }
        reference["bandwidth"] = float(reference["bandwidth"])
        model = autoencoder.from_arrays(arrays, int(meta["channels"]))
        pca = [arrays[f"pca.{k}"] for k in ("mean", "components", "scale")]
    return Profile(meta, reference, *pca, model)
