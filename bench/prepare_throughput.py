"""Images per second and peak memory of prepare + validate (every check on, default policies).

Writes N distinct synthetic 32x32 RGB PNGs (10 classes) in a temporary folder, then runs prepare and
validate on them (prepare.channels 3, prepare.workers 0 = one process per core) in a fresh
Python process, so the peak resident memory is that run's alone. The same is measured on a
fifth of the images: memory that grows with the images should be the manifest and the shards
(the output) and nothing else. Library imports (torch, Great Expectations) happen before the
clock starts: a fixed cost, not a per-image one. Prints one JSON line.

    python bench/prepare_throughput.py [--images 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TARGET_IMAGES_PER_SECOND = 1500
CLASSES = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measured run
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return

    with tempfile.TemporaryDirectory(prefix="lensflow-bench-") as tmp:
        small_n = args.images // 5
        write_images(Path(tmp) / "small", small_n)
        write_images(Path(tmp) / "full", args.images)
        small = run_measured(Path(tmp) / "small")
        full = run_measured(Path(tmp) / "full")

    seconds = full["prepare_s"] + full["validate_s"]
    growth = (full["peak_rss_main_mb"] - small["peak_rss_main_mb"]) * 2**20
    per_image = growth / (args.images - small_n)
    speed = args.images / seconds
    print(
        json.dumps(
            {
                "bench": "prepare_throughput",
                "n_images": args.images,
                "workers": full["workers"],
                "cpus": os.cpu_count(),
                "prepare_s": round(full["prepare_s"], 2),
                "validate_s": round(full["validate_s"], 2),
                "images_per_second": round(speed),
                "target_images_per_second": TARGET_IMAGES_PER_SECOND,
                "passed": speed >= TARGET_IMAGES_PER_SECOND,
                "validation_success": full["success"],
                "peak_rss_main_mb": round(full["peak_rss_main_mb"]),
                "peak_rss_worker_mb": round(full["peak_rss_worker_mb"]),
                "small_run": {
                    "n_images": small_n,
                    "peak_rss_main_mb": round(small["peak_rss_main_mb"]),
                    "images_per_second": round(
                        small_n / (small["prepare_s"] + small["validate_s"])
                    ),
                },
                "rss_growth_bytes_per_image": round(per_image),
                "manifest_bytes_per_image": round(full["manifest_bytes"] / args.images),
                "shard_bytes_per_image": full["shard_bytes_per_image"],
            }
        )
    )


def write_images(root: Path, n: int) -> None:
    """n distinct 32x32 RGB PNGs in 10 class folders: random waves in a random colour."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:32, 0:32] / 32
    for i in range(n):
        folder = root / f"class_{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        waves = np.zeros((32, 32))
        for _ in range(3):
            fx, fy, phase = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(0, 2 * np.pi)
            waves += np.sin(2 * np.pi * (fx * xs + fy * ys) + phase)
        colour = rng.uniform(10, 40, size=3)
        pixels = 128 + waves[..., None] * colour + rng.normal(0, 8, size=(32, 32, 3))
        image = np.clip(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(image, mode="RGB").save(folder / f"{i:06d}.png", compress_level=1)


def run_measured(root: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(root: Path) -> dict:
    """prepare + validate on `root` in a scratch project; run in its own process."""
    import great_expectations  # noqa: F401  (a fixed import cost, kept off the clock)
    import pandas as pd

    from components.core import config, paths
    from components.data import prepare, validate

    cfg = config.from_dict({"data": {"source": str(root)}, "prepare": {"channels": 3}})
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-project-") as project:
        os.chdir(project)
        start = time.perf_counter()
        prepare.run(cfg)
        prepared = time.perf_counter()
        result = validate.run(cfg, track=False)
        validated = time.perf_counter()
        manifest = pd.read_parquet(paths.MANIFEST)
        manifest_bytes = int(manifest.memory_usage(deep=True).sum())
    workers = cfg.prepare.workers or len(os.sched_getaffinity(0))
    size = cfg.prepare.image_size
    return {
        "workers": workers,
        "prepare_s": prepared - start,
        "validate_s": validated - prepared,
        "success": result.success,
        "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "manifest_bytes": manifest_bytes,
        "shard_bytes_per_image": cfg.prepare.channels * size * size,
    }


if __name__ == "__main__":
    main()
