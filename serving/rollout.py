"""A live rollout in one serve worker (serve.rollout: shadow | canary).

A second Follower keeps `@challenger` loaded beside the champion. Each request gets an id; a
hash of it picks serve.shadow_fraction of the requests to be *paired*: the model that did not
answer scores the same decoded images after the answer is computed, in a process of its own
(serving/offpath.py, nice 19), so it never delays the answer (nor takes the GIL from it) and
its failures never reach the client. The worker's event loop sends that process, PAIR_EVERY_S
after a job queues, what queued meanwhile, through a non-blocking pipe (no thread of ours
contends for the GIL with the answers); it scores them, and writes each pair (both top-1
classes, confidences, latencies, versions, the image's SHA-256) to the pair log
(components/release/rollout_log.py).

Canary: a hash of the client key (serve.canary_key_header, else of the body) below the
fraction the controller wrote on the challenger version (tag `lensflow.canary_fraction`)
sends the request to the challenger; a client keeps its model while the fraction grows. A
challenger that fails answers nothing: the champion answers, and the failure is paired.

SIGTERM: the worker stops taking requests; its lifespan's end (`drain()`) sends the last jobs
and `close()` waits for the off-path process to score them and write its last part, so no
pair of an answered request is lost. A worker killed outright: its off-path process still
writes what it was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import pickle
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import Counter

from components.core.params_operations import Serve
from components.release import rollout_log
from components.release.rollout import FRACTION_TAG
from serving import offpath
from serving.follower import Follower

log = logging.getLogger("lensflow.serve")
PAIR_EVERY_S = 0.02
CLOSE_SECONDS = 60  # for the off-path process to score what it was sent and write it
KEPT_MODELS = 4  # versions the off-path process keeps loaded, the least recently paired out


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
    """One paired request: what the answering model said, and the images for the other one:
    the decoded `arrays`, or the request's bytes (`data`) when it takes other channels (a
    grayscale champion, an RGB challenger). `error`: the canary challenger failed, the champion
    answered; nothing to score."""

    request_id: str
    role: str  # who answered: champion | challenger
    answering: object
    other: object
    arrays: list[np.ndarray]
    probabilities: list[np.ndarray]
    seconds: float
    fingerprints: list[str]
    images: list[bytes] | None = None  # logged with the pair (serve.log_images)
    data: list[bytes] | None = None  # the other model takes other channels: decoded off-path
    error: str | None = None
    time: float = field(default_factory=time.time)

    def message(self) -> dict:
        """What the off-path process gets: the models by version, the rest as it is."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**fields, "answering": self.answering.version, "other": self.other.version}


class Rollout:
    def __init__(self, settings: Serve, root: Path, registry):
        self.settings, self.mode, self.root = settings, settings.rollout, root
        self.slot = Slot(settings)
        self.worker = rollout_log.worker_name()
        self.label_writer = rollout_log.PartWriter(root, "labels", self.worker)
        self.pair_index = rollout_log.Index(root, "pairs")
        self.label_index = rollout_log.Index(root, "labels")
        self.queue: list[Job] = []
        self.recent: dict[tuple[str, int], float] = {}  # keys sent to pair -> when (known())
        self.metrics = RolloutMetrics(registry)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sending: asyncio.TimerHandle | None = None  # the next send, while jobs queue
        self.attaching: asyncio.Task | None = None  # a replacement process's attach(), kept
        self.drained = False
        self._start_offpath()

    def _start_offpath(self) -> None:
        """A fresh off-path process (at the start, or after the last one died)."""
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self.done = context.Value("q", 0, lock=False)  # jobs it finished; only it writes
        self.sent, self.models_sent = 0, OrderedDict()  # version -> None, least recent first
        receiver, self.conn = context.Pipe(duplex=False)
        self.offpath = context.Process(
            target=offpath.main, name="lensflow-offpath", daemon=True,
            args=(receiver, self.settings.model_dump(), self.root, self.worker, self.done),
        )  # fmt: skip
        self.offpath.start()
        receiver.close()  # the worker keeps only its end: the process sees EOF when it dies
        self.pipe: asyncio.WriteTransport | None = None

    async def attach(self) -> None:
        """In the worker's event loop (its lifespan's start): the pipe made non-blocking, a
        transport of the loop writing it."""
        self.loop = asyncio.get_running_loop()
        self.pipe, _ = await self.loop.connect_write_pipe(lambda: _Pipe(self), self.conn)

    @property
    def pending(self) -> int:
        """Jobs queued here or sent and not yet finished by the off-path process."""
        return len(self.queue) + self.sent - self.done.value

    def pick(self, champion, client_key) -> tuple[object, object | None, str]:
        """(the model that answers, the other one or None, who answers). `client_key()`: the
        canary's key for this request, computed only in a canary."""
        challenger = self.slot.model
        if challenger is None or challenger.version == champion.version:
            return champion, None, "champion"
        if self.mode == "canary" and bucket(client_key()) < self.slot.fraction:
            return challenger, champion, "challenger"
        return champion, challenger, "champion"

    def sampled(self, request_id: str) -> bool:
        fraction = self.settings.shadow_fraction
        return fraction >= 1.0 or bucket(request_id) < fraction

    def submit(self, job: Job) -> None:
        """Queue the other model's scoring; past serve.rollout_max_pending, skip (counted)."""
        if self.pending >= self.settings.rollout_max_pending:
            self.metrics.skipped.inc()
            return
        self._queue(job)

    def failed(self, job: Job, error: str) -> None:
        """The challenger failed to answer (canary): the champion answered; pair the failure."""
        self.metrics.challenger_errors.inc()
        job.error = error
        self._queue(job)

    def _queue(self, job: Job) -> None:
        if self.pipe is None:  # not attached yet, or the process is being replaced
            self.metrics.skipped.inc()
            return
        self.queue.append(job)
        if self.sending is None and self.loop is not None:
            self.sending = self.loop.call_later(PAIR_EVERY_S, self._send_queued)

    def _send_queued(self) -> None:
        """What queued since the last send, in one message (and the models it needs first)."""
        jobs, self.queue, self.sending = self.queue, [], None
        if not jobs:
            return
        if self.pipe is None:
            self.metrics.skipped.inc(len(jobs))
            return
        now = time.monotonic()
        for job in jobs:
            self.recent.update(((job.request_id, i), now) for i in range(len(job.arrays)))
        self._send_models(jobs)
        self._write(("jobs", [job.message() for job in jobs]))
        self.sent += len(jobs)
        self._forget_old(now)

    def _write(self, message: tuple) -> None:
        """The frame multiprocessing's Connection.recv reads: a 4-byte big-endian length,
        then the pickle. The transport writes what the pipe takes now, the rest when it can."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.pipe.write(struct.pack("!i", len(data)) + data)

    def _send_models(self, jobs: list[Job]) -> None:
        """Each model the jobs need, once; the least recently paired past KEPT_MODELS out."""
        for job in jobs:
            for model in (job.answering, job.other):
                if model.version in self.models_sent:
                    self.models_sent.move_to_end(model.version)
                else:
                    self._write(("model", (model.version, model.onnx, model.classes,
                                           model.channels)))  # fmt: skip
                    self.models_sent[model.version] = None
        while len(self.models_sent) > KEPT_MODELS:
            self._write(("forget", self.models_sent.popitem(last=False)[0]))

    def _lost(self) -> None:
        """The off-path process died (its pipe closed): the jobs it had not finished are lost
        (counted); a new one is started and attached."""
        lost = self.sent - self.done.value
        log.error("the off-path process ended (exit code %s); starting another, %d pairs "
                  "lost", self.offpath.exitcode, lost)  # fmt: skip
        self.metrics.skipped.inc(lost)
        if not self.drained:
            self._start_offpath()
            self.attaching = self.loop.create_task(self.attach())  # the loop holds tasks weakly

    def _forget_old(self, now: float) -> None:
        """Keys sent long enough ago to be in a written part (Index finds them there)."""
        horizon = now - 10 * self.settings.rollout_flush_seconds - 10
        if self.recent and next(iter(self.recent.values())) < horizon:
            self.recent = {key: t for key, t in self.recent.items() if t >= horizon}

    def known(self, keys: set[tuple[str, int]]) -> set:
        """Which of these (request id, image) keys were paired: sent here lately, or in any
        worker's parts."""
        found = {key for key in keys if key in self.recent}
        return found | self.pair_index.find(keys - found)

    def labelled(self, keys: set) -> set:
        return self.label_index.find(keys)

    def add_labels(self, rows: list[dict]) -> None:
        """Written at once, one part per POST /feedback: the other workers see a label as
        soon as its request is answered, so a duplicate sent to any worker is recognised."""
        self.label_writer.write(rows, rollout_log.LABEL_COLUMNS)

    async def drain(self) -> None:
        """The lifespan's end, after the last request: the queued jobs and `stop` sent, and
        written into the pipe before the loop ends."""
        if self.sending is not None:
            self.sending.cancel()
        self._send_queued()
        self.drained, pipe = True, self.pipe
        if pipe is None:
            return
        self._write(("stop", None))
        deadline = time.monotonic() + CLOSE_SECONDS
        while pipe.get_write_buffer_size() and not pipe.is_closing():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        pipe.close()

    def close(self) -> None:
        """After the event loop: wait for the off-path process to score what it was sent and
        write its last part (it also ends on EOF, if the lifespan never drained)."""
        self.drained = True
        self.conn.close()
        self.offpath.join(CLOSE_SECONDS)
        if self.offpath.is_alive():
            log.error("the off-path process did not end in %d s; stopping it", CLOSE_SECONDS)
            self.offpath.kill()


class _Pipe(asyncio.Protocol):
    """The worker's end of the pipe to the off-path process: closed by the reader's end."""

    def __init__(self, rollout: Rollout):
        self.rollout = rollout

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None or not self.rollout.drained:
            self.rollout.pipe = None
            self.rollout._lost()


class RolloutMetrics:
    """The worker's side; the pairs' own (agreement, latency, confidence per model) are the
    off-path process's (serving/offpath.py, PairMetrics)."""

    def __init__(self, r):
        self.skipped = Counter(
            "lensflow_rollout_skipped", "requests not paired: too many waiting", registry=r
        )
        self.challenger_errors = Counter(
            "lensflow_rollout_model_errors", "the off-path or canary model failed", registry=r
        )
        answers = Counter(
            "lensflow_rollout_answers", "answers by the model that gave them", ["role"], registry=r
        )
        self.answered = {role: answers.labels(role) for role in ("champion", "challenger")}
        self.feedback = Counter(
            "lensflow_feedback", "labels received", ["outcome"], registry=r
        )  # outcome: recorded | duplicate | unknown_id | bad_label
