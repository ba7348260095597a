"""The thread that keeps the served model current: it looks the alias up every
serve.poll_seconds, loads and checks a new version off the request path, and swaps it in.

A failed load is classified (serving/model.py): a transient one (network, an HTTP 5xx, I/O, a
golden file that could not be downloaded) is retried at later polls with a doubling delay, for
a pinned version or an .onnx file too; a deterministic one (golden mismatch, an invalid model,
no class list) is refused and remembered. A failed alias lookup marks the registry
unreachable: one WARN when the outage starts, one INFO when it ends, and /model and /metrics
say so meanwhile; the model already loaded keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from serving.model import Refused, Source, Transient, alias_version, load

log = logging.getLogger("lensflow.serve")
MAX_BACKOFF_SECONDS = 60.0


@dataclass
class Retry:
    attempts: int
    next_at: float  # time.monotonic()
    reason: str


class Follower(threading.Thread):
    def __init__(self, service, source: Source):
        super().__init__(name="lensflow-follower", daemon=True)
        self.service = service
        self.source = source
        self.stop = threading.Event()
        self.retries: dict[str, Retry] = {}
        self._alias_missing_logged = False

    def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # a bug here must not end the thread: the next poll tries again
                log.exception("following %s failed", self.source.uri)
            if self._settled() or self.stop.wait(self.service.settings.poll_seconds):
                return

    def _settled(self) -> bool:
        """A pinned version or a file is followed until it is served or refused."""
        return self.source.alias is None and (
            self.service.model is not None or self.service.refused is not None
        )

    def poll(self) -> None:
        version = self._lookup()
        if version is None:
            return
        service = self.service
        served = service.model.version if service.model else None
        refused = service.refused["version"] if service.refused else None
        retry = self.retries.get(version)
        if version in (served, refused) or (retry and time.monotonic() < retry.next_at):
            return
        log.info("%s -> version %s: loading and checking it", self.source.uri, version)
        try:
            model = load(self.source, version, service.settings)
        except Transient as exc:
            self._retry_later(version, str(exc))
            return
        except Refused as exc:
            self.retries.pop(version, None)
            service.refuse(version, str(exc))
            return
        self.retries.pop(version, None)
        service.swap(model)

    def _lookup(self) -> str | None:
        source, registry = self.source, self.service.registry
        if source.alias is None:
            return source.version or "file"
        try:
            version = alias_version(source)
        except Exception as exc:  # unreachable, timed out, a 5xx: keep serving what we have
            registry.failed(f"{type(exc).__name__}: {exc}")
            return None
        registry.answered()
        if version is None and not self._alias_missing_logged:
            log.info("%s: no such alias yet", source.uri)
        self._alias_missing_logged = version is None
        return version

    def _retry_later(self, version: str, reason: str) -> None:
        attempts = self.retries[version].attempts + 1 if version in self.retries else 1
        poll = self.service.settings.poll_seconds
        delay = min(poll * 2 ** (attempts - 1), max(poll, MAX_BACKOFF_SECONDS))
        self.retries[version] = Retry(attempts, time.monotonic() + delay, reason)
        self.service.load_failed(version, reason, attempts, delay)


class RegistryStatus:
    """Whether the last alias lookup answered, and when one last did (what /model shows)."""

    def __init__(self, metrics, followed: bool):
        self.metrics = metrics
        self.followed = followed
        self.reachable: bool | None = None  # None: not asked yet
        self.last_ok: float | None = None
        self.error: str | None = None
        self.down_since: float | None = None
        if not followed:  # a pinned version or a file: no lookups, nothing to report
            metrics.registry_up.set(float("nan"))

    def answered(self) -> None:
        now = time.time()
        if self.reachable is False:
            log.info("the registry answers again (unreachable for %.0f s)", now - self.down_since)
        self.reachable, self.last_ok, self.error, self.down_since = True, now, None, None
        self.metrics.registry_up.set(1)
        self.metrics.registry_last_ok.set(now)

    def failed(self, error: str) -> None:
        if self.reachable is not False:
            self.down_since = time.time()
            log.warning("the registry is unreachable; still serving what was loaded: %s", error)
        self.reachable, self.error = False, error[:300]
        self.metrics.registry_up.set(0)

    def as_dict(self) -> dict | None:
        if not self.followed:
            return None
        return {
            "reachable": self.reachable,
            "last_ok": _iso(self.last_ok),
            "unreachable_since": _iso(self.down_since),
            "error": self.error,
        }


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
