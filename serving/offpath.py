"""A rollout's off-path work, in a process of its own beside each serve worker: the other
model's scoring of the paired requests, the pairs' metrics and the pair log's Parquet parts.

In the worker these took the GIL from the answers for ~1.5 ms of Python every 20 ms
(bench/README.md, shadow_cost); here they share nothing with it but a pipe and the cores, at
nice serve.offpath_nice (19, with SCHED_IDLE: only the cores the answers leave free). The
worker sends each model once (its ONNX bytes and classes; `forget` when it no longer pairs it)
and, serving/rollout.PAIR_EVERY_S after a job queues, the jobs that queued meanwhile; this
process scores them as one batch per model and image shape, appends one row per paired image
to its buffer and writes the buffer as a part every serve.rollout_flush_seconds (or at
serve.rollout_part_rows). Its metrics go to prometheus-client's multiprocess files, which the
worker's /metrics sums.

It ends when the worker sends `stop` (after the last request) or goes away (its pipe closes):
either way it writes what it holds first. SIGINT/SIGTERM are ignored here: a Ctrl-C reaches the
whole process group, and the worker decides when the last job has been sent.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from components.core.params_operations import Serve
from components.release import rollout_log
from serving import images

log = logging.getLogger("lensflow.serve")
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def main(conn, settings: dict, root: Path, worker: str, done) -> None:
    """The process's entry: serve the worker's messages until `stop` or its end."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    lower_priority(settings["offpath_nice"])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    Pairer(Serve(**settings), root, worker, done).serve(conn)


def lower_priority(nice: int) -> None:
    """Nice `nice`; at 19 also Linux's SCHED_IDLE policy, under every nice level: a worker
    thread that wakes preempts this process at once and takes a core it runs on as idle
    (nice 19 alone still gets a slice of a busy core). Both hold against processes of the
    worker's session only: with autogroups each session gets its share of the CPU first, so
    this process must never call setsid (bench/README.md, shadow_cost, 2026-12-07)."""
    os.nice(nice)
    if nice == 19 and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class Pairer:
    def __init__(self, settings: Serve, root: Path, worker: str, done):
        self.settings = settings
        self.writer = rollout_log.PartWriter(root, "pairs", worker)
        self.done = done  # jobs finished, shared with the worker (its count of waiting jobs)
        self.models: dict[str, tuple] = {}  # version -> (session, classes, channels)
        self.rows: list[dict] = []
        self.metrics = PairMetrics()

    def serve(self, conn) -> None:
        every = self.settings.rollout_flush_seconds
        next_flush = time.monotonic() + every
        try:
            while True:
                if conn.poll(max(0.0, next_flush - time.monotonic())):
                    message = conn.recv()
                    if message[0] == "stop":
                        break
                    self.handle(message)
                full = len(self.rows) >= self.settings.rollout_part_rows
                if full or time.monotonic() >= next_flush:
                    self.flush()
                    next_flush = time.monotonic() + every
        except EOFError:  # the worker is gone: keep what it sent
            log.warning("off-path: the serve worker went away; writing the last pairs")
        finally:
            self.flush()

    def handle(self, message: tuple) -> None:
        kind, payload = message
        if kind == "model":
            self._load(*payload)
        elif kind == "forget":  # a version the worker no longer pairs
            self.models.pop(payload, None)
        elif kind == "jobs":
            try:
                self.pair(payload)
            except Exception:
                log.exception("off-path: pairing %d requests failed", len(payload))
            finally:
                self.done.value += len(payload)

    def _load(self, version: str, onnx: bytes, classes: list[str], channels: int) -> None:
        from serving.model import session

        self.models[version] = (session(onnx, self.settings.threads), classes, channels)

    def pair(self, jobs: list[dict]) -> None:
        rows = []
        for job, (other, seconds, error) in zip(jobs, self.score(jobs), strict=True):
            rows += self._rows(job, other, seconds, error)
        self.rows.extend(rows)
        self._observe(rows)

    def score(self, jobs: list[dict]) -> list[tuple[list, float, str | None]]:
        """Per job: the other model's probabilities per image (None where it failed), its
        seconds per image, its error. One batch per model and image shape."""
        other = [[None] * len(job["arrays"]) for job in jobs]
        seconds, errors = [0.0] * len(jobs), [job["error"] for job in jobs]
        groups = defaultdict(list)  # (version, shape) -> [(job, image, array)]
        for j, job in enumerate(jobs):
            if errors[j] is not None:  # the canary challenger failed: nothing to score
                continue
            try:
                arrays = self._inputs(job)
            except Exception as exc:  # the off-path model's failure is data, never an answer's
                errors[j] = _error(exc, self.metrics)
                continue
            for i, array in enumerate(arrays):
                groups[(job["other"], array.shape)].append((j, i, array))
        for (version, _), members in groups.items():
            start = time.perf_counter()
            try:
                batch = np.concatenate([array for _, _, array in members])
                found = self.models[version][0].run(["probabilities"], {"images": batch})[0]
            except Exception as exc:
                for j, _, _ in members:
                    errors[j] = _error(exc, self.metrics)
                continue
            each = (time.perf_counter() - start) / len(members)
            for (j, i, _), probabilities in zip(members, found, strict=True):
                other[j][i], seconds[j] = probabilities, each
        return list(zip(other, seconds, errors, strict=True))

    def _inputs(self, job: dict) -> list[np.ndarray]:
        """The other model's images: the answering model's arrays, or the request's bytes
        decoded at the other model's channels."""
        if job["data"] is None:
            return job["arrays"]
        channels = self.models[job["other"]][2]
        return [
            images.to_array(images.open_image(data, self.settings.max_pixels, "image"), data,
                            channels, "image")
            for data in job["data"]
        ]  # fmt: skip

    def _rows(self, job: dict, other: list, other_seconds: float, error: str | None) -> list:
        role = job["role"]
        other_role = "challenger" if role == "champion" else "champion"
        each = job["seconds"] / max(len(job["arrays"]), 1)
        rows = []
        for index, (mine, theirs) in enumerate(zip(job["probabilities"], other, strict=True)):
            row = {"request_id": job["request_id"], "image": index, "time": job["time"],
                   "fingerprint": job["fingerprints"][index], "answered_by": role}  # fmt: skip
            row.update(self._side(role, job["answering"], mine, each, None))
            row.update(self._side(other_role, job["other"], theirs, other_seconds, error))
            if job["images"] is not None:
                row["image_bytes"] = job["images"][index]
            rows.append(row)
        return rows

    def _side(self, role: str, version: str, probabilities, seconds: float, error) -> dict:
        top = None if probabilities is None else int(np.argmax(probabilities))
        return {
            f"{role}_version": version,
            f"{role}_class": None if top is None else self.models[version][1][top],
            f"{role}_confidence": None if top is None else float(probabilities[top]),
            f"{role}_ms": round(seconds * 1000, 3),
            f"{role}_error": error,
        }

    def _observe(self, rows: list[dict]) -> None:
        m = self.metrics
        m.pairs.inc(len(rows))
        m.agreements.inc(sum(r["champion_class"] == r["challenger_class"] for r in rows))
        for role in ("champion", "challenger"):
            for row in rows:
                if row[f"{role}_confidence"] is not None:
                    m.seconds.labels(role).observe(row[f"{role}_ms"] / 1000)
                    m.confidence.labels(role).observe(row[f"{role}_confidence"])

    def flush(self) -> None:
        rows, self.rows = self.rows, []
        try:
            self.writer.write(rows, rollout_log.PAIR_COLUMNS)
        except Exception:  # a full disk: keep the rows for the next try
            log.exception("off-path: writing the pair log failed")
            self.rows = rows + self.rows


def _error(exc: Exception, metrics) -> str:
    metrics.model_errors.inc()
    return f"{type(exc).__name__}: {exc}"[:300]


class PairMetrics:
    """The pairs' metrics; with PROMETHEUS_MULTIPROC_DIR set (serving/server.py sets it for a
    rollout) the worker's /metrics includes them."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = CollectorRegistry()  # not the default one: the names are the worker's too
        self.pairs = Counter("lensflow_rollout_pairs", "images scored by both models", registry=r)
        self.agreements = Counter(
            "lensflow_rollout_agreements", "pairs whose top-1 classes agree", registry=r
        )
        self.model_errors = Counter(
            "lensflow_rollout_model_errors", "the off-path or canary model failed", registry=r
        )
        self.seconds = Histogram(
            "lensflow_rollout_model_seconds", "inference time per image, paired requests",
            ["role"], buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.confidence = Histogram(
            "lensflow_rollout_confidence", "top-1 probability, paired requests", ["role"],
            buckets=CONFIDENCE_BUCKETS, registry=r,
        )  # fmt: skip
