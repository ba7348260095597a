"""The HTTP service: Starlette endpoints over the model a Follower keeps current.

Each request reads `service.model` once and uses that model to the end, so a swap (one
attribute assignment) never mixes two versions in one answer and never fails a request.

A request passes three gates, each answering at once when full or late rather than queueing:
bodies still being read are bounded by serve.max_reading and must arrive within
serve.body_timeout_seconds (408); only then does the request count against
serve.max_in_flight, so slow uploads cannot lock complete requests out. Small requests
(at most INLINE_PIXELS) are decoded and scored on the event loop's own thread, where a thread
hop would cost more than the model; bigger ones go to a pool of serve.pool_threads threads
(Pillow and ONNX Runtime release the GIL), so /health and small requests keep answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from components.core.params_operations import Serve
from serving import feedback, images
from serving.batching import MicroBatcher
from serving.follower import RegistryStatus
from serving.images import BadRequest
from serving.metrics import Metrics
from serving.model import ServedModel, Source, boxes

log = logging.getLogger("lensflow.serve")
INLINE_PIXELS = 256 * 256  # a request up to this many pixels in all runs on the event loop
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before the answer


class Service:
    """What the endpoints share: the model served now, the last refusal, the counters."""

    def __init__(self, settings: Serve, source: Source):
        self.settings = settings
        self.source_uri = source.uri
        self.model: ServedModel | None = None
        self.refused: dict | None = None
        self.retrying: dict | None = None
        self.in_flight = 0
        self.reading = 0
        self.metrics = Metrics()
        self.registry = RegistryStatus(self.metrics, followed=source.alias is not None)
        self.batcher = MicroBatcher(settings.batch_max, settings.batch_wait_ms / 1000)
        self.pool = ThreadPoolExecutor(settings.pool_threads, thread_name_prefix="lensflow-work")
        self.rollout = None  # serving/rollout.py's Rollout when serve.rollout is on

    def swap(self, model: ServedModel) -> None:
        self.model = model  # one reference assignment: atomic for every reader
        self.retrying = None
        self.metrics.swaps.inc()
        self.metrics.version.set(float(model.version) if model.version.isdigit() else 0)
        log.info("serving version %s (%s)", model.version, model.info.get("variant", "fp32"))

    def refuse(self, version: str, reason: str) -> None:
        self.refused = {"version": version, "reason": reason, "at": _now()}
        self.retrying = None
        self.metrics.refusals.inc()
        self.metrics.refused_version(version, reason)
        kept = self.model.version if self.model else "none"
        log.error("version %s refused, still serving %s: %s", version, kept, reason)

    def load_failed(self, version: str, reason: str, attempts: int, delay: float) -> None:
        self.retrying = {"version": version, "reason": reason, "attempts": attempts, "at": _now()}
        self.metrics.load_failures.inc()
        log.warning("version %s: %s; retrying in %.1f s (attempt %d)", version, reason, delay,
                    attempts)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The micro-batcher's queue and a rollout's pipe live in the event loop; uvicorn ends
        the lifespan after the requests in flight are answered, so the last pairs are sent."""
        async with self.batcher.lifespan(app):
            if self.rollout is not None:
                await self.rollout.attach()
            try:
                yield
            finally:
                if self.rollout is not None:
                    await self.rollout.drain()

    def busy(self, message: str) -> BadRequest:
        return BadRequest(503, message, {"Retry-After": str(self.settings.retry_after_seconds)})


def build(service: Service) -> Starlette:
    metrics = service.metrics
    latency = metrics.latency.labels("/predict")
    by_status = {}

    def counted(status: int):  # a labelled child, looked up once per status
        if status not in by_status:
            by_status[status] = metrics.requests.labels("/predict", status)
        return by_status[status]

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        model = service.model
        status, headers = 200, {}
        try:
            body = await _answer(request, model, service)
        except BadRequest as exc:
            status, headers = exc.status, exc.headers
            body = _error(exc.status, exc.message, model.version if model else None)
        except ClientDisconnect:  # nobody to answer: counted, not logged
            status, body = CLIENT_GONE, b""
        except asyncio.CancelledError:  # serve.shutdown_timeout passed while its body trickled
            status, body = 503, _error(503, "the server is shutting down")
        except Exception:  # a bug or a model that fails at run time: counted, logged
            log.exception("POST /predict failed")
            status, body = 500, _error(500, "internal error (logged by the server)")
        if not getattr(request.state, "body_in", False):
            headers["Connection"] = "close"  # the rest of the body is not worth reading
        counted(status).inc()
        if status >= 400:
            metrics.errors.labels("/predict", status).inc()
        latency.observe(time.perf_counter() - start)
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
        return _json({
            "source": service.source_uri, "served": served, "refused": service.refused,
            "retrying": service.retrying, "registry": service.registry.as_dict(),
            "rollout": _rollout_info(service.rollout),
        })  # fmt: skip

    async def prometheus(request: Request) -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

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
        Route("/feedback", feedback.endpoint(service, _read_body, _json), methods=["POST"]),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=service.lifespan)


async def _answer(request: Request, model: ServedModel | None, service: Service) -> bytes:
    settings = service.settings
    if model is None:
        raise service.busy("no model loaded yet (see /model)")
    k = _top_k(request, settings, len(model.classes))
    content_type = request.headers.get("content-type", "")
    kind = _content_kind(content_type)
    body = await _read_body(request, service)
    if service.in_flight >= settings.max_in_flight:
        raise service.busy(f"{service.in_flight} requests in progress, retry")
    service.in_flight += 1
    service.metrics.in_flight.inc()
    try:
        files = _files(body, kind, content_type, settings)
        return await _classify(files, model, k, service, request, body)
    finally:
        service.in_flight -= 1
        service.metrics.in_flight.dec()


async def _classify(files: list, champion: ServedModel, k: int, service: Service,
                    request: Request, body: bytes) -> bytes:  # fmt: skip
    """Score with the model that answers (the champion, or in a canary the challenger, which
    falls back to the champion when it fails); hand a paired request to the rollout."""
    request_id = secrets.token_hex(16)  # unguessable, as /feedback keys on it
    rollout = service.rollout
    model, other, role = champion, None, "champion"
    if rollout is not None:
        model, other, role = rollout.pick(champion, lambda: _client_key(request, body, service))
    paired = (
        other is not None and rollout.sampled(request_id)
        and model.task == other.task == "classification"  # a rollout pairs probabilities
    )  # fmt: skip
    start = time.perf_counter()
    try:
        probabilities, arrays = await _score(files, model, service, keep=paired)
    except BadRequest:
        raise
    except Exception as exc:
        if role != "challenger":
            raise
        log.warning("challenger %s failed, the champion answers: %s", model.version, exc)
        start, failed = time.perf_counter(), model
        model, role, paired = champion, "champion", False
        probabilities, arrays = await _score(files, model, service, keep=True)
        rollout.failed(_job(request_id, role, model, failed, arrays, probabilities, start, files,
                            service), f"{type(exc).__name__}: {exc}"[:300])  # fmt: skip
    if paired:
        rollout.submit(
            _job(request_id, role, model, other, arrays, probabilities, start, files, service)
        )
    service.metrics.images.inc(len(files))
    predictions = []
    for (name, _), p in zip(files, probabilities, strict=True):
        if model.task == "detection":
            predictions.append({"image": name, "boxes": boxes(p, model.classes)})
            continue
        values = p.tolist()  # Python floats: indexing a NumPy array per class costs more
        order = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
        top = [{"class": model.classes[i], "probability": round(values[i], 6)} for i in order]
        predictions.append({"image": name, "top_k": top})
    answer = {"request_id": request_id, "model_version": model.version}
    if rollout is not None:
        answer["answered_by"] = role
        rollout.metrics.answered[role].inc()
    return orjson.dumps({**answer, "predictions": predictions})


async def _score(files: list, model: ServedModel, service: Service, keep: bool) -> tuple:
    """(probabilities per image, the decoded arrays when `keep` else [])."""
    opened = _open_all(files, service.settings)
    pixels = sum(image.width * image.height for image in opened)
    if pixels <= INLINE_PIXELS:
        arrays = [
            images.to_array(image, data, model.channels, name)
            for image, (name, data) in zip(opened, files, strict=True)
        ]
        probabilities = [await service.batcher.predict(model, array) for array in arrays]
        return probabilities, arrays if keep else []
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(service.pool, _decode_and_score, model, opened, files, keep)


def _client_key(request: Request, body: bytes, service: Service) -> str:
    """What keeps a canary client on one model: its key header, else the body's hash."""
    key = request.headers.get(service.settings.canary_key_header)
    return key or hashlib.sha256(body).hexdigest()


def _job(request_id, role, model, other, arrays, probabilities, start, files, service):
    from serving.rollout import Job

    contents = [data for _, data in files]
    return Job(
        request_id, role, model, other, arrays, probabilities, time.perf_counter() - start,
        [hashlib.sha256(data).hexdigest() for data in contents],
        contents if service.settings.log_images else None,
        contents if other.channels != model.channels else None,  # decoded again off the path
    )  # fmt: skip


def _open_all(files: list[tuple[str, bytes]], settings: Serve) -> list:
    """Every image with its header read; the request's pixels checked before any decoding."""
    opened = []
    try:
        for name, data in files:
            opened.append(images.open_image(data, settings.max_pixels, name))
        pixels = sum(image.width * image.height for image in opened)
        if pixels > settings.max_request_pixels:
            raise BadRequest(
                413, f"{len(files)} images of {pixels:,} pixels in all, over "
                f"serve.max_request_pixels ({settings.max_request_pixels:,})",
            )  # fmt: skip
    except BadRequest:
        for image in opened:
            image.close()
        raise
    return opened


def _decode_and_score(model: ServedModel, opened: list, files: list, keep: bool) -> tuple:
    """On a pool thread: one image decoded at a time, so one decoded array is held at once
    (all of them when `keep`: a paired request's other model scores them too)."""
    probabilities, kept = [], []
    for index, (image, (name, data)) in enumerate(zip(opened, files, strict=True)):
        try:
            array = images.to_array(image, data, model.channels, name)
        except BadRequest:
            for rest in opened[index + 1 :]:
                rest.close()
            raise
        probabilities.append(model.predict(array)[0])
        if keep:
            kept.append(array)
    return probabilities, kept


def _content_kind(content_type: str) -> str:
    kind = content_type.split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise BadRequest(
            415, f"Content-Type {kind or 'missing'}: send image/* bytes or multipart/form-data"
        )
    return kind


def _files(body: bytes, kind: str, content_type: str, settings: Serve) -> list:
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


async def _read_body(request: Request, service: Service) -> bytes:
    """The whole body within serve.body_timeout_seconds, counted among the bodies being read."""
    settings = service.settings
    limit = settings.max_upload_bytes
    too_large = f"the body is over serve.max_upload_bytes ({limit:,} bytes)"
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, too_large)  # refused before reading a byte of it
    if service.reading >= settings.max_reading:
        raise service.busy(f"{service.reading} request bodies being read, retry")
    service.reading += 1
    service.metrics.reading.inc()
    chunks, size, receive = [], 0, request.receive  # ASGI messages: no stream generator
    try:
        async with asyncio.timeout(settings.body_timeout_seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BadRequest(413, too_large)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        seconds = settings.body_timeout_seconds
        raise BadRequest(408, f"the body did not arrive within {seconds:g} s "
                         "(serve.body_timeout_seconds)") from None  # fmt: skip
    finally:
        service.reading -= 1
        service.metrics.reading.dec()
    request.state.body_in = True
    return b"".join(chunks)


def _top_k(request: Request, settings: Serve, n_classes: int) -> int:
    text = request.query_params.get("top_k") if request.scope["query_string"] else None
    if text is None:
        return min(settings.top_k, n_classes)
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise BadRequest(400, f"top_k={text!r}: expected a whole number >= 1")
    return min(int(text), n_classes)


def _rollout_info(rollout) -> dict | None:
    if rollout is None:
        return None
    challenger = rollout.slot.model
    return {
        "mode": rollout.mode, "challenger": challenger.version if challenger else None,
        "canary_fraction": rollout.slot.fraction if rollout.mode == "canary" else None,
        "refused": rollout.slot.refused, "waiting_to_pair": rollout.pending,
    }  # fmt: skip


def _error(status: int, message: str, version: str | None = None) -> bytes:
    error = {"error": {"status": status, "message": message}}
    if version is not None:
        error["model_version"] = version
    return json.dumps(error).encode()


def _json(data: dict, status: int = 200) -> Response:
    return Response(json.dumps(data), status, media_type="application/json")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
