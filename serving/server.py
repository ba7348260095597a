"""`lensflow serve`: one uvicorn worker running the Starlette app, and a thread that follows
the registry alias (serve.poll_seconds) and swaps in each new version that passes its checks.

SIGTERM (and Ctrl-C): uvicorn stops accepting, lets the requests in flight finish (at most
serve.shutdown_timeout seconds), ends the lifespan; then the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from components.core.config import Config
from components.core.errors import UserError
from serving.app import Service, build
from serving.model import Refused, Source, alias_version, load, parse

log = logging.getLogger("lensflow.serve")


class Follower(threading.Thread):
    """Loads the version the source points to, then (for an alias) looks it up every
    poll_seconds; a new version is loaded and checked off the request path, then swapped in."""

    def __init__(self, service: Service, source: Source):
        super().__init__(name="lensflow-follower", daemon=True)
        self.service = service
        self.source = source
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # the registry is unreachable for a while: keep serving
                log.exception(
                    "looking up %s failed; still serving what was loaded", self.source.uri
                )
            if self.source.alias is None or self.stop.wait(self.service.settings.poll_seconds):
                return

    def refresh(self) -> None:
        source, service = self.source, self.service
        version = alias_version(source) if source.alias else (source.version or "file")
        if version is None:
            log.info("%s: no such alias yet", source.uri)
            return
        served = service.model.version if service.model else None
        refused = service.refused["version"] if service.refused else None
        if version in (served, refused):
            return
        log.info("%s -> version %s: loading and checking it", source.uri, version)
        try:
            model = load(source, version, service.settings)
        except Refused as exc:
            service.refuse(str(version), str(exc))
            return
        service.swap(model)


def run(cfg: Config, model_uri: str | None) -> int:
    import mlflow
    import uvicorn

    from components.core import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    settings = cfg.serve
    source = parse(model_uri or f"models:/{cfg.registry.model_name}@champion")
    listener = _listen(settings.host, settings.port)
    _log_to_stderr()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    service = Service(settings, source.uri)
    follower = Follower(service, source)
    follower.start()
    config = uvicorn.Config(
        build(service),
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=settings.shutdown_timeout,
        lifespan="on",
    )
    # uvicorn takes over SIGTERM/SIGINT while serving and sends the signal again after its
    # graceful shutdown: ignored then, so that shutdown ends the command with exit code 0.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    print(f"lensflow serve: {source.uri} on http://{settings.host}:{settings.port}", flush=True)
    uvicorn.Server(config).run(sockets=[listener])
    follower.stop.set()
    print("lensflow serve: stopped", flush=True)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear error. Its protocol is
    IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on such sockets, and with
    Nagle on every response waits ~40 ms for the client's delayed ACK."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        raise UserError(f"serve: cannot listen on {host}:{port} ({exc.strerror})") from None
    return listener


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
