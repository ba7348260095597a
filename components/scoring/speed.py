"""Latency and throughput of any backend, measured the same way for every format."""

from __future__ import annotations

import time

import numpy as np


def measure(predict, images: np.ndarray, batch_size: int = 64, seconds: float = 1.0) -> dict:
    """p50/p95 latency at batch 1 and images/s at `batch_size`, after a warm-up call each."""
    singles = images[: min(len(images), 100)]
    predict(singles[:1])
    latencies = []
    for image in singles:
        start = time.perf_counter()
        predict(image[None])
        latencies.append((time.perf_counter() - start) * 1000)

    batch = np.resize(images[:batch_size], (batch_size, *images.shape[1:]))  # repeats if too few
    predict(batch)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        predict(batch)
        runs += 1
    elapsed = time.perf_counter() - start
    return {
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 3),
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 3),
        "images_per_s": round(runs * batch_size / elapsed, 1),
        "batch_size": batch_size,
    }
