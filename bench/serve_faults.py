"""`lensflow serve` under faults, with normal clients (wrk, concurrency 4, digits PNGs):
  - quiet, then with 256 slow connections open (each sent POST headers with Content-Length
    1000 and one body byte, then waits), taking turns for a few rounds (the median round of
    each): requests/s ratio, p99 and server CPU per request;
  - with one 4096² RGB PNG request per second interleaved: p99 of the small requests;
  - with the registry (a real `mlflow server` the service follows @champion through) stopped
    (SIGSTOP) for 30 s: failed requests, and what /model said meanwhile.
One worker (`--workers 1`), so that the numbers are the mechanisms', not the core count's.
The project is serve_load.py's (trained and registered digits, twice). Prints one JSON line;
without wrk it prints why it skipped.

    python bench/serve_faults.py [--seconds 10] [--rounds 3] [--project DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from serve_load import _bodies, _cpu_seconds, _free_port, _parse, _project, _stop, _wrk

REPO = Path(__file__).resolve().parents[1]
SLOW_CONNECTIONS = 256
OUTAGE_SECONDS = 30
TARGETS = {"slow_ratio": 0.9, "p99_ms": 50.0, "big_p99_ms": 50.0, "outage_failures": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="quiet/slow rounds (default 3)")
    parser.add_argument("--project", help="serve_load.py's project folder, reused if present")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print(
            json.dumps({"bench": "serve_faults", "skipped": "wrk not found: apt-get install wrk"})
        )
        return
    with tempfile.TemporaryDirectory(prefix="lensflow-serve-faults-") as tmp:
        root = Path(args.project or tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = _project(root)
        bodies = _bodies(root, env)
        print(json.dumps(_run(root, env, bodies, args.seconds, args.rounds, wrk)))


def _run(root: Path, env: dict, bodies: dict, seconds: int, rounds: int, wrk: str) -> dict:
    load_before = os.getloadavg()[0]
    registry = _mlflow_server(root, env)
    port = _free_port()
    serve_env = {**env, "MLFLOW_TRACKING_URI": registry["url"]}
    serve = _serve(root, serve_env, port)
    try:
        _wrk(root, port, bodies["png"], "png", 4, 2).communicate()  # warm-up
        quiet, with_slow, ratio = _slow_rounds(root, serve, port, bodies, seconds, rounds)
        with_big = _with_big_requests(root, port, bodies, seconds)
        outage = _outage(root, port, bodies, registry["process"], OUTAGE_SECONDS)
    finally:
        _stop(serve)
        os.killpg(registry["process"].pid, signal.SIGCONT)
        _stop_group(registry["process"])
    meets = (
        ratio >= TARGETS["slow_ratio"]
        and with_slow["p99_ms"] <= TARGETS["p99_ms"]
        and with_big["small"]["p99_ms"] <= TARGETS["big_p99_ms"]
        and outage["load"]["errors"] == TARGETS["outage_failures"]
    )
    return {
        "bench": "serve_faults",
        "load_generator": f"{wrk} -t1 -c4 -d{seconds}s (loopback)",
        "cpus": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "quiet": quiet,
        f"with_{SLOW_CONNECTIONS}_slow_connections": with_slow,
        "slow_ratio": round(ratio, 3),
        "with_big_requests": with_big,
        "registry_outage": outage,
        "targets": TARGETS,
        "meets_targets": meets,
    }


def _mlflow_server(root: Path, env: dict) -> dict:
    """`mlflow server` on the project's registry, as lensflow's stacks start it."""
    sys.path.insert(0, str(REPO))
    from infra.stack import mlflow_server

    port = _free_port()
    command, extra = mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "served"), port)
    log = open(root / "mlflow-server.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        command, cwd=root, env={**env, **extra}, stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", process)
    return {"url": url, "process": process}


def _serve(root: Path, env: dict, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--workers", "1",
               "--poll-seconds", "1", "--set", "serve.registry_timeout_seconds=2"]  # fmt: skip
    log = open(root / "serve-faults.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=log)
    _wait(f"http://127.0.0.1:{port}/ready", process)
    return process


def _wait(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.3)
    raise RuntimeError(f"{url} never answered")


def _slow_rounds(root: Path, serve, port: int, bodies: dict, seconds: int, rounds: int):
    """(quiet, with slow connections, their requests/s ratio): the two take turns; the median
    round of each, and the median over the rounds of the ratio within a round (seconds apart,
    so that load coming and going on a shared machine cancels out)."""
    runs = {"quiet": [], "slow": []}
    for _ in range(rounds):
        runs["quiet"].append(_measured(root, serve, port, bodies, seconds))
        slow = _slow_clients(port, SLOW_CONNECTIONS)
        runs["slow"].append(_measured(root, serve, port, bodies, seconds))
        for connection in slow:
            connection.close()
    median = {k: sorted(r, key=lambda x: x["requests_per_s"])[len(r) // 2] for k, r in runs.items()}
    within = sorted(
        slow["requests_per_s"] / max(quiet["requests_per_s"], 1)
        for quiet, slow in zip(runs["quiet"], runs["slow"], strict=True)
    )
    return median["quiet"], median["slow"], within[len(within) // 2]


def _measured(root: Path, serve, port: int, bodies: dict, seconds: int) -> dict:
    cpu_before = _cpu_seconds(serve)
    result = _parse(_wrk(root, port, bodies["png"], "png", 4, seconds).communicate()[0])
    cpu = _cpu_seconds(serve) - cpu_before
    per_request = round(1000 * cpu / max(result["requests"], 1), 3)
    return {**result, "server_cpu_ms_per_request": per_request}


def _slow_clients(port: int, count: int) -> list[socket.socket]:
    head = b"POST /predict HTTP/1.1\r\nHost: b\r\nContent-Type: image/png\r\n"
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(head + b"Content-Length: 1000\r\n\r\n\x89")
        connections.append(connection)
    return connections


def _big_png() -> bytes:
    """A 4096² RGB PNG (a colour ramp: small to send, 50 MB once decoded)."""
    import numpy as np
    from PIL import Image

    ramp = np.add.outer(np.arange(4096), np.arange(4096)) % 256
    pixels = np.stack([ramp, ramp.T, 255 - ramp], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _with_big_requests(root: Path, port: int, bodies: dict, seconds: int) -> dict:
    """wrk's small requests while another client posts one 4096² RGB PNG a second."""
    big, answers, stop = _big_png(), [], threading.Event()

    def post_big():
        while not stop.is_set():
            started = time.monotonic()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict", big, {"Content-Type": "image/png"}
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                answers.append((answer.status, time.monotonic() - started))
            stop.wait(max(0.0, 1 - (time.monotonic() - started)))

    poster = threading.Thread(target=post_big)
    poster.start()
    small = _parse(_wrk(root, port, bodies["png"], "png", 4, seconds).communicate()[0])
    stop.set()
    poster.join()
    return {
        "small": small,
        "big_requests": len(answers),
        "big_statuses": sorted({status for status, _ in answers}),
        "big_seconds_max": round(max((s for _, s in answers), default=0), 2),
        "big_bytes": len(big),
    }


def _outage(root: Path, port: int, bodies: dict, registry, seconds: int) -> dict:
    """wrk for the outage and 10 s around it; /model read in the middle of the outage."""
    load = _wrk(root, port, bodies["png"], "png", 4, seconds + 10)
    time.sleep(5)
    os.killpg(registry.pid, signal.SIGSTOP)
    time.sleep(seconds / 2)
    during = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/model").read())
    time.sleep(seconds / 2)
    os.killpg(registry.pid, signal.SIGCONT)
    result = _parse(load.communicate()[0])
    time.sleep(3)
    after = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/model").read())
    return {
        "seconds": seconds,
        "load": result,
        "registry_during": during["registry"],
        "registry_after": after["registry"],
    }


def _stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


if __name__ == "__main__":
    main()
