"""The HTTP service: Starlette endpoints over the model a Follower keeps current.

Each request reads `service.model` once and uses that model to the end, so a swap (one
attribute assignment) never mixes two versions in one answer and never fails a request.
Inference runs on the event loop's own thread: for small models a thread hop costs more than
the model. Work in progress is bounded by serve.max_in_flight; past it a request gets 503
with Retry-After at once, before its body is read.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from components.core.params_operations import Serve
from serving import images
from serving.batching import MicroBatcher
from serving.images import BadRequest
from serving.model import ServedModel

log = logging.getLogger("lensflow.serve")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lensflow_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "lensflow_request_errors", "requests answered 4xx/5xx", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "lensflow_request_seconds", "time to answer", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.images = Counter("lensflow_images", "images classified", registry=r)
        self.in_flight = Gauge("lensflow_in_flight", "requests in progress", registry=r)
        self.version = Gauge("lensflow_model_version", "version served (-1: none)", registry=r)
        self.version.set(-1)
        self.swaps = Counter("lensflow_model_swaps", "versions swapped in", registry=r)
        self.refusals = Counter(
            "lensflow_model_refusals", "versions refused (load or golden check)", registry=r
        )
        self.refused = Gauge(
            "lensflow_model_refused_info", "the last refused version and why",
            ["version", "reason"], registry=r,
        )  # fmt: skip


class Service:
    """What the endpoints share: the model served now, the last refusal, the counters."""

    def __init__(self, settings: Serve, source_uri: str):
        self.settings = settings
        self.source_uri = source_uri
        self.model: ServedModel | None = None
        self.refused: dict | None = None
        self.in_flight = 0
        self.metrics = Metrics()
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.batcher = MicroBatcher(settings.batch_max, settings.batch_wait_ms / 1000)

    def swap(self, model: ServedModel) -> None:
        self.model = model  # one reference assignment: atomic for every reader
        self.metrics.swaps.inc()
        self.metrics.version.set(float(model.version) if model.version.isdigit() else 0)
        log.info("serving version %s (%s)", model.version, model.info.get("variant", "fp32"))

    def refuse(self, version: str, reason: str) -> None:
        self.refused = {"version": version, "reason": reason, "at": _now()}
        self.metrics.refusals.inc()
        self.metrics.refused.clear()
        self.metrics.refused.labels(version, reason[:200]).set(1)
        kept = self.model.version if self.model else "none"
        log.error("version %s refused, still serving %s: %s", version, kept, reason)


def build(service: Service) -> Starlette:
    settings, metrics = service.settings, service.metrics

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        model = service.model
        status, body, headers = 200, None, None
        if service.in_flight >= settings.max_in_flight:
            status, body = 503, _error(503, f"{service.in_flight} requests in progress, retry")
            headers = {"Retry-After": str(settings.retry_after_seconds)}
        elif model is None:
            status, body = 503, _error(503, "no model loaded yet (see /model)")
            headers = {"Retry-After": str(settings.retry_after_seconds)}
        else:
            service.in_flight += 1
            try:
                body = await _classify(request, model, service)
            except BadRequest as exc:
                status, body = exc.status, _error(exc.status, exc.message, model.version)
            except Exception:  # a bug or a model that fails at run time: counted, logged
                log.exception("POST /predict failed")
                status, body = 500, _error(500, "internal error (logged by the server)")
            finally:
                service.in_flight -= 1
        metrics.requests.labels("/predict", status).inc()
        if status >= 400:
            metrics.errors.labels("/predict", status).inc()
        metrics.latency.labels("/predict").observe(time.perf_counter() - start)
        return Response(body, status, headers, media_type="application/json")

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(request: Request) -> Response:
        model = service.model
        if model is None:
            return _json({"ready": False, "reason": "no model loaded yet"}, 503)
        return _json({"ready": True, "model_version": model.version})

    async def model_info(request: Request) -> Response:
        model = service.model
        served = {"version": model.version, **model.info} if model else None
        return _json({"source": service.source_uri, "served": served, "refused": service.refused})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return Response(_error(exc.status_code, exc.detail), exc.status_code, exc.headers,
                        media_type="application/json")  # fmt: skip

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)  # the trace stays in the log
        return Response(_error(500, "internal error (logged by the server)"), 500,
                        media_type="application/json")  # fmt: skip

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/health", health),
        Route("/ready", ready),
        Route("/model", model_info),
        Route("/metrics", prometheus),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=service.batcher.lifespan)


async def _classify(request: Request, model: ServedModel, service: Service) -> bytes:
    settings = service.settings
    k = _top_k(request, settings, len(model.classes))
    files = await _read_files(request, settings)
    arrays = [
        images.decode(data, model.channels, settings.max_pixels, name) for name, data in files
    ]
    probabilities = [await service.batcher.predict(model, array) for array in arrays]
    service.metrics.images.inc(len(arrays))
    predictions = []
    for (name, _), p in zip(files, probabilities, strict=True):
        order = np.argsort(-p)[:k]
        top = [{"class": model.classes[i], "probability": round(float(p[i]), 6)} for i in order]
        predictions.append({"image": name, "top_k": top})
    return json.dumps({"model_version": model.version, "predictions": predictions}).encode()


async def _read_files(request: Request, settings: Serve) -> list[tuple[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise BadRequest(
            415, f"Content-Type {kind or 'missing'}: send image/* bytes or multipart/form-data"
        )
    body = await _read_body(request, settings.max_upload_bytes)
    if not body:
        raise BadRequest(400, "the request body is empty")
    files = (
        images.multipart_files(body, content_type)
        if kind.startswith("multi")
        else [("image", body)]
    )
    if len(files) > settings.max_images:
        raise BadRequest(413, f"{len(files)} images, over serve.max_images ({settings.max_images})")
    return files


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = f"the body is over serve.max_upload_bytes ({limit:,} bytes)"
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, too_large)  # refused before reading a byte of it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _top_k(request: Request, settings: Serve, n_classes: int) -> int:
    text = request.query_params.get("top_k")
    if text is None:
        return min(settings.top_k, n_classes)
    if not text.isdigit() or int(text) < 1:
        raise BadRequest(400, f"top_k={text!r}: expected a whole number >= 1")
    return min(int(text), n_classes)


def _error(status: int, message: str, version: str | None = None) -> bytes:
    error = {"error": {"status": status, "message": message}}
    if version is not None:
        error["model_version"] = version
    return json.dumps(error).encode()


def _json(data: dict, status: int = 200) -> Response:
    return Response(json.dumps(data), status, media_type="application/json")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
