"""`lensflow serve`: serve.workers processes on one port, each a uvicorn server running the
Starlette app and a Follower thread that keeps its model current (serving/follower.py).

One worker serves on the socket bound here. Several are forked from this process before any
thread starts; each binds the port with SO_REUSEPORT, so the kernel spreads connections evenly
over them (one shared listening socket lets whichever worker wakes first take most of them).
This process then only supervises: it restarts a worker that dies and passes SIGTERM on; a
worker whose supervisor dies (even by SIGKILL) gets a SIGTERM of its own and shuts down.

SIGTERM (and Ctrl-C): uvicorn stops accepting, lets the requests in flight finish (at most
serve.shutdown_timeout seconds), ends the lifespan; then the process exits 0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import tempfile
import time

from components.core.config import Config
from components.core.errors import UserError
from serving.model import Source, parse

log = logging.getLogger("lensflow.serve")
STARTUP_SECONDS = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run(cfg: Config, model_uri: str | None) -> int:
    settings = cfg.serve
    source = parse(model_uri or f"models:/{cfg.registry.model_name}@champion")
    workers = worker_count(settings.workers)
    if settings.rollout != "off":
        from components.release import rollout_log

        rollout_dir = rollout_log.folder(cfg)  # a folder inside the project: refused here
        if source.alias is None:
            raise UserError("serve.rollout: follow an alias (--model models:/NAME@ALIAS)")
    listener = _listen(settings.host, settings.port, reuse_port=workers > 1)
    _log_to_stderr()
    _short_registry_requests(settings.registry_timeout_seconds)
    where = f"http://{settings.host}:{settings.port}"
    print(f"lensflow serve: {source.uri} on {where} ({workers} workers)", flush=True)
    if settings.rollout != "off":
        print(f"lensflow serve: rollout {settings.rollout}, pair log in {rollout_dir}", flush=True)
    code = 0
    # several processes (workers, a rollout's off-path ones) give /metrics one set of values
    metrics_dir = _multiprocess_metrics() if workers > 1 or settings.rollout != "off" else None
    if workers == 1:
        _serve(cfg, source, listener)
    else:
        listener.close()  # a listening socket nobody accepts on would still get connections
        code = _supervise(cfg, source, workers)
    if metrics_dir is not None:
        metrics_dir.cleanup()
    print("lensflow serve: stopped", flush=True)
    return code


def _multiprocess_metrics() -> tempfile.TemporaryDirectory:
    """prometheus-client's multiprocess mode (serving/metrics.py), in a folder of its own."""
    metrics_dir = tempfile.TemporaryDirectory(prefix="lensflow-serve-metrics-")
    if "prometheus_client" in sys.modules:  # it picks its value store when first imported
        raise RuntimeError("prometheus_client was imported before its multiprocess dir was set")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    return metrics_dir


def worker_count(workers: int | str) -> int:
    if workers == "auto":
        return len(os.sched_getaffinity(0))
    return int(workers)


def _serve(cfg: Config, source: Source, listener: socket.socket) -> None:
    import mlflow
    import uvicorn

    from components.core import tracking
    from serving.app import Service, build
    from serving.follower import Follower
    from serving.protocol import with_header_deadline

    settings = cfg.serve
    mlflow.set_tracking_uri(tracking.tracking_uri())
    service = Service(settings, source)
    follower = Follower(service, source)
    follower.start()
    challenger = _start_rollout(cfg, service, source)
    config = uvicorn.Config(
        build(service),
        http=with_header_deadline(settings.header_timeout_seconds),
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=settings.shutdown_timeout,
        lifespan="on",
    )
    # uvicorn takes over SIGTERM/SIGINT while serving and sends the signal again after its
    # graceful shutdown: ignored then, so that shutdown ends the command with exit code 0.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    uvicorn.Server(config).run(sockets=[listener])
    follower.stop.set()
    if challenger is not None:
        challenger.stop.set()
        service.rollout.close()  # the last pairs written before the worker exits
    service.pool.shutdown(wait=False, cancel_futures=True)


def _start_rollout(cfg: Config, service, source: Source):
    """serve.rollout on: the pair log and a Follower of `@challenger`."""
    if cfg.serve.rollout == "off":
        return None
    from components.release import rollout_log
    from serving.rollout import ChallengerFollower, Rollout

    root = rollout_log.folder(cfg)
    service.rollout = Rollout(cfg.serve, root, service.metrics.registry)
    challenger = Source(f"models:/{source.name}@challenger", name=source.name, alias="challenger")
    follower = ChallengerFollower(service.rollout.slot, challenger)
    follower.start()
    return follower


def _supervise(cfg: Config, source: Source, workers: int) -> int:
    """Fork the workers, restart one that dies unasked, pass SIGTERM/SIGINT on, wait for all.
    A worker that dies within STARTUP_SECONDS of its start stops them all (exit code 1):
    restarting it would only fail again."""
    children: dict[int, float] = {}  # pid -> when it started
    stopping, code = False, 0

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    for _ in range(workers):
        children[_fork_worker(cfg, source)] = time.monotonic()
    while children:
        pid, status = os.wait()
        started = children.pop(pid)
        _mark_dead(pid)
        if stopping:
            continue
        if time.monotonic() - started < STARTUP_SECONDS:
            log.error("worker %d ended at its start (status %d); stopping", pid, status)
            code = 1
            stop(signal.SIGTERM, None)
            continue
        log.error("worker %d ended (status %d); starting another", pid, status)
        children[_fork_worker(cfg, source)] = time.monotonic()
    return code


def _fork_worker(cfg: Config, source: Source) -> int:
    supervisor = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        _end_with(supervisor)
        settings = cfg.serve
        _serve(cfg, source, _listen(settings.host, settings.port, reuse_port=True))
    except BaseException:
        log.exception("worker %d failed", os.getpid())
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def _end_with(supervisor: int) -> None:
    """A SIGTERM (the graceful shutdown) when the supervisor dies, even by SIGKILL: orphaned
    workers would go on holding the port. Linux only (prctl); elsewhere they stay."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # its live gauges (in flight, version) leave /metrics


def _short_registry_requests(timeout_seconds: int) -> None:
    """MLflow's client retries a failing request for about 4 minutes by default, which would
    hide an outage and stall the follower: the service's requests give up after one try of
    serve.registry_timeout_seconds, and the follower's next poll is the retry."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_seconds)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear error. Its protocol is
    IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on such sockets, and with
    Nagle on every response waits ~40 ms for the client's delayed ACK."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        raise UserError(f"serve: cannot listen on {host}:{port} ({exc.strerror})") from None
    return listener


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
