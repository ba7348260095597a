"""A live rollout in one serve worker (serve.rollout: shadow | canary).

A second Follower keeps `@challenger` loaded beside the champion. Each request gets an id; a
hash of it picks serve.shadow_fraction of the requests to be *paired*: the model that did not
answer scores the same decoded images on a thread of its own, after the answer is computed,
so it never delays the answer and its failures never reach the client. That thread runs at
nice 19 and wakes every PAIR_EVERY_S to score what queued meanwhile as one batch per model
and image shape: a wake-up per request would take the GIL from the answers that often. Each
pair (both top-1 classes, confidences, latencies, versions, the image's SHA-256) goes to a
buffer that a thread writes as Parquet parts of the pair log (components/release/rollout_log.py).

Canary: a hash of the client key (serve.canary_key_header, else of the body) below the
fraction the controller wrote on the challenger version (tag `lensflow.canary_fraction`)
sends the request to the challenger; a client keeps its model while the fraction grows. A
challenger that fails answers nothing: the champion answers, and the failure is paired.

SIGTERM: the worker stops taking requests, then `close()` waits for the paired jobs and
writes the last part, so no pair of an answered request is lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Histogram

from components.core.params_operations import Serve
from components.release import rollout_log
from components.release.rollout import FRACTION_TAG
from serving.follower import Follower

log = logging.getLogger("lensflow.serve")
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
PAIR_EVERY_S = 0.02
SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def lower_priority() -> None:
    """Nice 19 for the calling thread only (Linux schedules threads): the other model's scoring
    and the pair log's writes get a core only when the answers leave one free; past
    serve.rollout_max_pending waiting jobs, requests go unpaired (counted) instead."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux: the threads keep the process's priority
        pass


def bucket(key: str) -> float:
    """A stable number in [0, 1) for a key: the same in every worker, no shared state."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


class LinkStatus:
    """The challenger follower's view of the registry (the champion's feeds /metrics)."""

    reachable: bool | None = None

    def answered(self) -> None:
        self.reachable = True

    def failed(self, error: str) -> None:
        self.reachable = False


class Slot:
    """The challenger's side: what its Follower keeps current, with the attributes a Follower
    uses on the service."""

    def __init__(self, settings: Serve):
        self.settings = settings
        self.model = None
        self.refused: dict | None = None
        self.fraction = 0.0
        self.registry = LinkStatus()

    def swap(self, model) -> None:
        self.model = model
        log.info("challenger: version %s loaded", model.version)

    def refuse(self, version: str, reason: str) -> None:
        self.refused = {"version": version, "reason": reason}
        log.error("challenger: version %s refused: %s", version, reason)

    def load_failed(self, version: str, reason: str, attempts: int, delay: float) -> None:
        log.warning("challenger: version %s: %s; retry in %.1f s", version, reason, delay)

    def clear(self) -> None:
        if self.model is not None:
            log.info("challenger: @challenger is gone (the rollout ended); unloaded")
        self.model, self.refused, self.fraction = None, None, 0.0


class ChallengerFollower(Follower):
    """Follows `@challenger`; no such alias (the registry answering) means no rollout now."""

    def _lookup(self) -> str | None:
        version = super()._lookup()
        slot = self.service
        if version is None and slot.registry.reachable:
            slot.clear()
        elif version is not None and slot.settings.rollout == "canary":
            slot.fraction = _fraction(self.source.name, version, slot.fraction)
        return version


def _fraction(name: str, version: str, current: float) -> float:
    import mlflow

    try:
        tags = mlflow.MlflowClient().get_model_version(name, version).tags
        return float(tags.get(FRACTION_TAG, 0.0))
    except Exception:  # the registry is down: keep the fraction we had
        return current


@dataclass
class Job:
    """One paired request: what the answering model said, and the images for the other one."""

    request_id: str
    role: str  # who answered: champion | challenger
    answering: object
    other: object
    arrays: list[np.ndarray]
    probabilities: list[np.ndarray]
    seconds: float
    fingerprints: list[str]
    images: list[bytes] | None = None


class Rollout:
    def __init__(self, settings: Serve, root: Path, registry):
        self.settings, self.mode = settings, settings.rollout
        self.slot = Slot(settings)
        worker = rollout_log.worker_name()
        self.pairs = rollout_log.PartWriter(root, "pairs", worker)
        self.label_writer = rollout_log.PartWriter(root, "labels", worker)
        self.pair_index = rollout_log.Index(root, "pairs")
        self.label_index = rollout_log.Index(root, "labels")
        self.rows: list[dict] = []
        self.lock = threading.Lock()
        self.queue: list[Job] = []
        self.pending = 0  # queued or being scored
        self.stop = threading.Event()
        self.pairer = threading.Thread(target=self._pair_often, name="lensflow-offpath")
        self.flusher = threading.Thread(
            target=self._flush_often, name="lensflow-pairlog", daemon=True
        )
        self.pairer.start()
        self.flusher.start()
        self.metrics = RolloutMetrics(registry)

    def pick(self, champion, key: str) -> tuple[object, object | None, str]:
        """(the model that answers, the other one or None, who answers)."""
        challenger = self.slot.model
        if challenger is None or challenger.version == champion.version:
            return champion, None, "champion"
        if self.mode == "canary" and bucket(key) < self.slot.fraction:
            return challenger, champion, "challenger"
        return champion, challenger, "champion"

    def sampled(self, request_id: str) -> bool:
        return bucket(request_id) < self.settings.shadow_fraction

    def submit(self, job: Job) -> None:
        """Queue the other model's scoring; past serve.rollout_max_pending, skip (counted)."""
        with self.lock:
            if self.pending >= self.settings.rollout_max_pending:
                self.metrics.skipped.inc()
                return
            self.pending += 1
            self.queue.append(job)

    def failed(self, job: Job, error: str) -> None:
        """The challenger failed to answer (canary): the champion answered; pair the failure."""
        self.metrics.challenger_errors.inc()
        with self.lock:
            self.rows.extend(self._rows(job, [None] * len(job.arrays), 0.0, error))

    def _pair_often(self) -> None:
        lower_priority()
        while not self.stop.wait(PAIR_EVERY_S):
            self._pair_queued()
        self._pair_queued()  # close(): what the last requests queued

    def _pair_queued(self) -> None:
        with self.lock:
            jobs, self.queue = self.queue, []
        if not jobs:
            return
        try:
            rows = []
            for job, (other, seconds, error) in zip(jobs, self._score(jobs), strict=True):
                rows += self._rows(job, other, seconds, error)
            with self.lock:
                self.rows.extend(rows)
            self._observe(rows)
        except Exception:
            log.exception("pairing %d requests failed", len(jobs))
        finally:
            with self.lock:
                self.pending -= len(jobs)

    def _score(self, jobs: list[Job]) -> list[tuple[list, float, str | None]]:
        """Per job: the other model's probabilities per image (None where it failed), its
        seconds per image, its error. One batch per model and image shape."""
        groups = defaultdict(list)  # (model, shape) -> [(job, image)]
        for j, job in enumerate(jobs):
            for i, array in enumerate(job.arrays):
                groups[(id(job.other), array.shape)].append((j, i))
        other = [[None] * len(job.arrays) for job in jobs]
        seconds, errors = [0.0] * len(jobs), [None] * len(jobs)
        for members in groups.values():
            start = time.perf_counter()
            try:
                model = jobs[members[0][0]].other
                batch = model.predict(np.concatenate([jobs[j].arrays[i] for j, i in members]))
            except Exception as exc:  # the off-path model's failure is data, never the answer's
                self.metrics.challenger_errors.inc()
                for j, _ in members:
                    errors[j] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            each = (time.perf_counter() - start) / len(members)
            for (j, i), probabilities in zip(members, batch, strict=True):
                other[j][i], seconds[j] = probabilities, each
        return list(zip(other, seconds, errors, strict=True))

    def _rows(self, job: Job, other: list, other_seconds: float, error: str | None) -> list[dict]:
        other_role = "challenger" if job.role == "champion" else "champion"
        each = job.seconds / max(len(job.arrays), 1)
        rows = []
        for index, (mine, theirs) in enumerate(zip(job.probabilities, other, strict=True)):
            row = {"request_id": job.request_id, "image": index, "time": time.time(),
                   "fingerprint": job.fingerprints[index], "answered_by": job.role}  # fmt: skip
            row.update(_side(job.role, job.answering, mine, each, None))
            row.update(_side(other_role, job.other, theirs, other_seconds, error))
            if job.images is not None:
                row["image_bytes"] = job.images[index]
            rows.append(row)
        return rows

    def _observe(self, rows: list[dict]) -> None:
        m = self.metrics
        for row in rows:
            m.pairs.inc()
            m.agreements.inc(row["champion_class"] == row["challenger_class"])
            for role in ("champion", "challenger"):
                if row[f"{role}_confidence"] is not None:
                    m.seconds.labels(role).observe(row[f"{role}_ms"] / 1000)
                    m.confidence.labels(role).observe(row[f"{role}_confidence"])

    def known(self, keys: set[tuple[str, int]]) -> set:
        """Which of these (request id, image) keys this worker's buffer or any part holds."""
        with self.lock:
            buffered = {(r["request_id"], r["image"]) for r in self.rows}
        found = keys & buffered
        return found | self.pair_index.find(keys - found)

    def labelled(self, keys: set) -> set:
        return self.label_index.find(keys)

    def add_labels(self, rows: list[dict]) -> None:
        """Written at once, one part per POST /feedback: the other workers see a label as
        soon as its request is answered, so a duplicate sent to any worker is recognised."""
        self.label_writer.write(rows, rollout_log.LABEL_COLUMNS)

    def flush(self) -> None:
        with self.lock:
            rows, self.rows = self.rows, []
        self.pairs.write(rows, rollout_log.PAIR_COLUMNS)

    def _flush_often(self) -> None:
        lower_priority()
        while not self.stop.wait(self.settings.rollout_flush_seconds):
            try:
                self.flush()
            except Exception:  # a full disk: the rows stay lost only if it never recovers
                log.exception("writing the pair log failed")

    def close(self) -> None:
        """After the last request: wait for the paired jobs, write what is buffered."""
        if self.stop.is_set():
            return
        self.stop.set()
        self.pairer.join()  # it scores what is still queued first
        self.flusher.join()
        self.flush()


def _side(role: str, model, probabilities, seconds: float, error: str | None) -> dict:
    top = None if probabilities is None else int(np.argmax(probabilities))
    return {
        f"{role}_version": model.version,
        f"{role}_class": None if top is None else model.classes[top],
        f"{role}_confidence": None if top is None else float(probabilities[top]),
        f"{role}_ms": round(seconds * 1000, 3),
        f"{role}_error": error,
    }


class RolloutMetrics:
    def __init__(self, r):
        self.pairs = Counter("lensflow_rollout_pairs", "requests scored by both models", registry=r)
        self.agreements = Counter(
            "lensflow_rollout_agreements", "pairs whose top-1 classes agree", registry=r
        )
        self.skipped = Counter(
            "lensflow_rollout_skipped", "requests not paired: too many waiting", registry=r
        )
        self.challenger_errors = Counter(
            "lensflow_rollout_model_errors", "the off-path or canary model failed", registry=r
        )
        self.answers = Counter(
            "lensflow_rollout_answers", "answers by the model that gave them", ["role"], registry=r
        )
        self.seconds = Histogram(
            "lensflow_rollout_model_seconds", "inference time per image, paired requests",
            ["role"], buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.confidence = Histogram(
            "lensflow_rollout_confidence", "top-1 probability, paired requests", ["role"],
            buckets=CONFIDENCE_BUCKETS, registry=r,
        )  # fmt: skip
        self.feedback = Counter(
            "lensflow_feedback", "labels received", ["outcome"], registry=r
        )  # outcome: recorded | duplicate | unknown_id | bad_label
