"""The service's Prometheus metrics, one set for all its worker processes.

With several workers (`--workers`), prometheus-client's multiprocess mode keeps each value in
a memory-mapped file of PROMETHEUS_MULTIPROC_DIR (set by serving/server.py before
prometheus_client is imported) and /metrics sums them, whichever worker answers. Gauges say how
they combine: in-flight counts add up (`livesum`), the registry is up only if every worker
reaches it (`min`), each worker's version is its own series (`liveall`, labelled by pid).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lensflow_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "lensflow_request_errors", "requests answered 4xx/5xx (499: the client went away)",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "lensflow_request_seconds", "time to answer", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.images = Counter("lensflow_images", "images classified", registry=r)
        self.in_flight = Gauge(
            "lensflow_in_flight", "requests being decoded and scored", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.reading = Gauge(
            "lensflow_reading", "requests whose body is being read", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.version = Gauge(
            "lensflow_model_version", "version served (-1: none)", registry=r,
            multiprocess_mode="liveall",
        )  # fmt: skip
        self.version.set(-1)
        self.swaps = Counter("lensflow_model_swaps", "versions swapped in", registry=r)
        self.refusals = Counter(
            "lensflow_model_refusals", "versions refused (load or golden check)", registry=r
        )
        self.refused = Gauge(
            "lensflow_model_refused_info", "the last refused version and why (1; 0: earlier)",
            ["version", "reason"], registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.load_failures = Counter(
            "lensflow_model_load_failures", "loads that failed and will be retried (transient)",
            registry=r,
        )  # fmt: skip
        self.registry_up = Gauge(
            "lensflow_registry_up",
            "1: the last alias lookup answered; 0: it failed; NaN: no alias is followed",
            registry=r, multiprocess_mode="min",
        )  # fmt: skip
        self.registry_last_ok = Gauge(
            "lensflow_registry_last_ok_seconds", "Unix time of the last lookup that answered",
            registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self._refused_labels: tuple[str, str] | None = None

    def refused_version(self, version: str, reason: str) -> None:
        """Multiprocess files keep a label set once written: the previous one goes to 0."""
        if self._refused_labels:
            self.refused.labels(*self._refused_labels).set(0)
        self._refused_labels = (version, reason[:200])
        self.refused.labels(*self._refused_labels).set(1)

    def text(self) -> bytes:
        if not os.environ.get(MULTIPROC_DIR):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined)
