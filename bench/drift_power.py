"""Power and false-alarm rate of continuous validation's drift checks, and the time of one pass.

Shapes: a fresh temporary project trains the default model on the built-in shapes (seed 42)
and exports it, which makes its reference profile (the test split's reference half). Batches
are then drawn with another seed, so the model, its PCA and its autoencoder never saw them:
clean batches (none used for calibration) and batches under Gaussian noise, Gaussian blur and
brightness at severities 1 and 3 of Hendrycks & Dietterich's corruptions (ImageNet-C's
parameters, and CIFAR-10-C's, the same functions with the milder parameters its authors chose
for 32x32 images like these), at 50 and 200 images a batch. Corruptions apply to the 32x32
images as written, before they are decoded and resized as the monitor reads files. Each batch
is scored in-process by the monitor's own functions (profile.signals, drift.permutations_for,
drift.checks, drift.bonferroni): the profile is loaded once. Then `lensflow monitor` runs once
on a folder of 1,000 PNGs.

Digits: a second project trains the default model on digits (real handwriting, the default
params) and exports it; clean batches of 50 are drawn from the test split's held-out half:
images the model was neither trained nor selected on, and that are not in the reference. The
false-alarm rate over them, with its Wilson 95 % interval. The held-out half has about 180
images, so these batches overlap: they measure the rate on this data, with less information
than as many independent batches.
Prints one JSON line.

    python bench/drift_power.py [--clean 200] [--corrupted 20] [--per-class 300]
                                [--digits-clean 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.core import config  # noqa: E402
from components.data import datasets, prepare, prepared, validate  # noqa: E402
from components.drift import drift  # noqa: E402
from components.drift import profile as reference_profile  # noqa: E402
from components.release import export  # noqa: E402
from components.scoring.backends import ort_session  # noqa: E402
from components.scoring.robustness import _blur  # noqa: E402
from components.training import train  # noqa: E402

BATCH_SIZES = (50, 200)
SEVERITIES = (1, 3)
# Hendrycks & Dietterich: make_imagenet_c.py and make_cifar_c.py, severities 1-5.
PRESETS = {
    "imagenet_c": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std, pixels in [0, 1]
        "gaussian_blur": (1, 2, 3, 4, 6),  # sigma, pixels
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to HSV value
    },
    "cifar_10_c": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    },
}
TARGET_DETECTION, TARGET_FALSE_ALARM_UPPER, TARGET_PASS_S = 0.95, 0.08, 30.0
TARGET_HELD_OUT_UPPER = 0.07  # Wilson 95 % upper bound of the digits false-alarm rate
DIGITS_BATCH = 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clean", type=int, default=200, help="clean batches per batch size")
    parser.add_argument("--corrupted", type=int, default=20, help="batches per corruption")
    parser.add_argument("--per-class", type=int, default=300, help="training data, per class")
    parser.add_argument("--digits-clean", type=int, default=1000, help="held-out digits batches")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lensflow-drift-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        cfg = _train_and_export(args.per_class)
        profile = reference_profile.load("models/profile.npz")
        session = ort_session(Path("models/model.onnx"))
        rng = np.random.default_rng(cfg.seed + 1000)  # the training data used cfg.seed
        score = _scorer(cfg, profile, session)
        start = time.perf_counter()
        false_alarms = _clean(score, rng, args.clean)
        detection = _corrupted(score, rng, args.corrupted)
        scoring_s = time.perf_counter() - start
        timing = _one_pass(cfg, rng, Path(tmp))
    with tempfile.TemporaryDirectory(prefix="lensflow-drift-digits-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        held_out = _digits_held_out(args.digits_clean)
    severity_3 = [v for k, v in detection["imagenet_c"].items() if "severity_3" in k]
    pooled = false_alarms["pooled"]
    print(json.dumps({
        "bench": "drift_power",
        "cpus": len(os.sched_getaffinity(0)),
        "false_alarm_rate_setting": cfg.monitor.false_alarm_rate,
        "reference_images": profile.meta["n_reference"],
        "test_accuracy": profile.meta["test_accuracy"],
        "false_alarms": false_alarms,
        "detection": detection,
        "scoring_s": round(scoring_s, 1),
        **timing,
        "digits_held_out": held_out,
        "meets_targets": {
            "detection_severity_3_at_50_and_200": min(severity_3) >= TARGET_DETECTION,
            "detection_severity_3_all": min(severity_3) == 1.0,
            "digits_held_out_wilson_upper": held_out["wilson_upper_95"] <= TARGET_HELD_OUT_UPPER,
            "false_alarm_upper": pooled["upper_95"] <= TARGET_FALSE_ALARM_UPPER,
            "pass_1000_images": timing["cli_wall_s"] <= TARGET_PASS_S,
        },
    }))  # fmt: skip


def _train_and_export(per_class: int) -> config.Config:
    cfg = config.from_dict({
        "data": {"source": "shapes", "shapes_per_class": per_class},
        "prepare": {"image_size": 16, "channels": 3},
        "train": {"progress_bar": False},
        "promote": {"min_accuracy": 0.0},
    })  # fmt: skip
    Path("params.yaml").write_text(json.dumps(cfg.as_dict()))  # YAML is a superset of JSON
    datasets.run(cfg)
    prepare.run(cfg)
    validate.run(cfg, track=False)
    train.run(cfg)
    export.run(cfg)  # the ONNX model and its reference profile
    return cfg


def _scorer(cfg, profile, session):
    classes = len(profile.meta["classes"])

    def score(raw: np.ndarray, seed: int) -> list[str]:
        """The checks that fire on raw 32x32 uint8 images [N, 3, 32, 32]."""
        images = _decode(raw, cfg.prepare.image_size)
        sizes = np.full(len(raw), raw.shape[-1])
        signals = reference_profile.signals(profile, session, images, sizes, sizes)
        return _fired(cfg, profile, signals, classes, seed)

    return score


def _fired(cfg, profile, signals: dict, classes: int, seed: int) -> list[str]:
    """The drift checks that fire, as the monitor runs them (permutations raised as needed)."""
    n_checks = drift.n_checks(profile.reference, signals)
    alpha = cfg.monitor.false_alarm_rate
    permutations, _ = drift.permutations_for(n_checks, alpha, cfg.monitor.permutations)
    tested = drift.checks(profile.reference, signals, classes, permutations, seed)
    return [c["name"] for c in drift.bonferroni(tested, alpha) if not c["passed"]]


def _digits_held_out(batches: int) -> dict:
    """False alarms on clean batches of digits' held-out test images."""
    cfg = config.from_dict({"train": {"progress_bar": False}})  # the defaults: digits
    Path("params.yaml").write_text(json.dumps(cfg.as_dict()))
    datasets.run(cfg)
    prepare.run(cfg)
    validate.run(cfg, track=False)
    train.run(cfg)
    export.run(cfg)  # the ONNX model and its reference profile (the test split's half)
    profile = reference_profile.load("models/profile.npz")
    session = ort_session(Path("models/model.onnx"))
    images, _ = prepared.load_split("test")
    _, held_out, test = reference_profile.test_halves(cfg.seed)
    widths, heights = test["width"].to_numpy(), test["height"].to_numpy()
    rng, classes = np.random.default_rng(cfg.seed + 2000), len(profile.meta["classes"])
    alerts, fired_by = 0, {}
    for i in range(batches):
        rows = np.sort(rng.choice(held_out, size=min(DIGITS_BATCH, len(held_out)), replace=False))
        batch = np.asarray(images[rows])
        signals = reference_profile.signals(profile, session, batch, widths[rows], heights[rows])
        fired = _fired(cfg, profile, signals, classes, seed=i)
        alerts += bool(fired)
        for name in fired:
            fired_by[name] = fired_by.get(name, 0) + 1
    return {
        "reference_images": profile.meta["n_reference"],
        "held_out_images": len(held_out),
        "batch": DIGITS_BATCH,
        "batches": batches,
        "alerts": alerts,
        "rate": round(alerts / batches, 4),
        "wilson_upper_95": round(_wilson_upper(alerts, batches), 4),
        "fired_by": fired_by,
        "test_accuracy": profile.meta["test_accuracy"],
    }


def _wilson_upper(k: int, n: int, z: float = 1.959964) -> float:
    """The upper end of the Wilson score 95 % interval of a rate k / n."""
    rate = k / n
    centre = rate + z * z / (2 * n)
    spread = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return float((centre + spread) / (1 + z * z / n))


def _decode(raw: np.ndarray, size: int) -> np.ndarray:
    """As the monitor reads a PNG of these pixels: resized with prepare's own resize."""
    import torch

    from components.data.preprocess import resize_uint8

    return resize_uint8(torch.from_numpy(raw), size).numpy()


def _draw(rng: np.random.Generator, n: int) -> np.ndarray:
    names = rng.choice(datasets.SHAPE_CLASSES, size=n)
    return np.stack([datasets.shape_image(name, rng).transpose(2, 0, 1) for name in names])


def corrupt(raw: np.ndarray, name: str, c: float, rng: np.random.Generator) -> np.ndarray:
    """Hendrycks & Dietterich's corruption `name` of strength c on uint8 [N, 3, H, W]."""
    x = raw.astype(np.float64) / 255
    if name == "gaussian_noise":
        x = x + rng.normal(0, c, size=x.shape)
    elif name == "gaussian_blur":
        x = _blur(x.astype(np.float32), c).astype(np.float64)
    elif name == "brightness":  # HSV value + c, hue and saturation kept: RGB scaled by V'/V
        value = x.max(axis=1, keepdims=True)
        x = x * np.where(value > 0, np.minimum(value + c, 1) / np.maximum(value, 1e-12), 0)
        x = np.where(value > 0, x, np.minimum(c, 1))
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _clean(score, rng, batches: int) -> dict:
    result, alerts_all, fired_by = {}, 0, {}
    for size in BATCH_SIZES:
        alerts = 0
        for i in range(batches):
            fired = score(_draw(rng, size), seed=i)
            alerts += bool(fired)
            for name in fired:
                fired_by[name] = fired_by.get(name, 0) + 1
        result[str(size)] = {"batches": batches, "alerts": alerts, **_rate(alerts, batches)}
        alerts_all += alerts
    result["pooled"] = {
        "batches": batches * len(BATCH_SIZES),
        "alerts": alerts_all,
        **_rate(alerts_all, batches * len(BATCH_SIZES)),
    }
    result["fired_by"] = fired_by
    return result


def _rate(k: int, n: int) -> dict:
    """The rate and its exact (Clopper-Pearson) 95 % interval."""
    from scipy.stats import beta

    lower = float(beta.ppf(0.025, k, n - k + 1)) if k else 0.0
    upper = float(beta.ppf(0.975, k + 1, n - k)) if k < n else 1.0
    return {"rate": round(k / n, 4), "lower_95": round(lower, 4), "upper_95": round(upper, 4)}


def _corrupted(score, rng, batches: int) -> dict:
    detection = {}
    for preset, corruptions in PRESETS.items():
        detection[preset] = {}
        for name, strengths in corruptions.items():
            for severity in SEVERITIES:
                for size in BATCH_SIZES:
                    hits = 0
                    for i in range(batches):
                        raw = corrupt(_draw(rng, size), name, strengths[severity - 1], rng)
                        hits += bool(score(raw, seed=i))
                    detection[preset][f"{name}/severity_{severity}/{size}"] = hits / batches
    return detection


def _one_pass(cfg, rng, project: Path) -> dict:
    """`lensflow monitor` on 1,000 PNGs (a flat folder), as a user runs it: its own process."""
    from PIL import Image

    folder = project / "batch"
    folder.mkdir()
    for i, image in enumerate(_draw(rng, 1000)):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(project / ".prefect")}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    command = [sys.executable, "-m", "cli.main", "monitor", "--data", str(folder)]
    command += ["--model", "models/model.onnx"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise RuntimeError(f"lensflow monitor failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads((project / "reports/monitoring.json").read_text())
    return {
        "cli_wall_s": round(wall, 1),
        "cli_alert": report["alert"],
        "cli_fired": report["fired"],
        "pass_images": report["batch"]["n_images"],
    }


if __name__ == "__main__":
    main()
