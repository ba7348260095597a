"""Requests/s and latency of `lensflow serve` against `mlflow models serve` and a bare endpoint,
driven by wrk (a load generator in C, outside the servers' Python processes), on 2 cores.

In a temporary project it trains, exports and registers the digits classifier twice (versions
1 and 2, the same model; @champion on 2), then sends the same test images, one per request:
  - lensflow serve        PNG bytes (image/png), the model the registry's @champion names
  - mlflow models serve   the JSON tensor it requires ({"inputs": [[[[...]]]]}), same champion
  - bare                  a dozen lines of Starlette: decode the PNG, run the same ONNX file
each at concurrency 1, 4 and 16 (one wrk thread), the three servers taking turns for a few
rounds. Then `lensflow serve --workers 2` against `--workers 1` at concurrency 16, taking turns
for the same rounds (requests/s and server CPU per request of each, the median round). Then the
failed requests while the alias flips between the two versions every second under load (hot
swaps), with two workers. Prints one JSON line; without wrk (Debian's package `wrk`) it prints
why it skipped.

    python bench/serve_load.py [--seconds 4] [--rounds 3] [--project DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16)
N_IMAGES = 100
SWAP_SECONDS = 12
TARGETS = {
    "vs_mlflow": 2.0, "vs_bare": 0.8, "p99_ms": 50.0, "swap_failures": 0, "workers_2_vs_1": 1.25
}  # fmt: skip
WORKERS_CONCURRENCY = 16
LUA = """
local bodies = {}
for path in io.lines(os.getenv("BENCH_BODIES")) do
  local file = io.open(path, "rb"); bodies[#bodies + 1] = file:read("*all"); file:close()
end
local headers = {["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")}
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, headers, bodies[i])
end
"""
BARE = """
import io, json, os
import numpy as np, onnxruntime as ort
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

options = ort.SessionOptions()
options.intra_op_num_threads = 1  # as lensflow serve: the fastest setting on these 2 cores
session = ort.InferenceSession(os.environ["BARE_ONNX"], options, providers=["CPUExecutionProvider"])

async def predict(request):
    image = np.asarray(Image.open(io.BytesIO(await request.body())).convert("L"))
    p = session.run(["probabilities"], {"images": image[None, None]})[0][0]
    return Response(json.dumps({"class": int(p.argmax()), "probability": float(p.max())}))

app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4, help="per wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--project", help="keep the trained project in this folder; reuse it when it has one"
    )
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        reason = "wrk not found: apt-get install wrk (a C load generator; .ci/run installs it)"
        print(json.dumps({"bench": "serve_load", "skipped": reason}))
        return
    with tempfile.TemporaryDirectory(prefix="lensflow-serve-bench-") as tmp:
        root = Path(args.project or tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = _project(root)
        bodies = _bodies(root, env)
        load_before = os.getloadavg()[0]
        runs = _measure(root, env, bodies, args.seconds, args.rounds)
        workers = _workers(root, env, bodies, args.seconds, args.rounds)
        swap = _hot_swap(root, env, bodies, SWAP_SECONDS)
    print(json.dumps(_summary(runs, workers, swap, load_before, args.seconds, wrk)))


def _project(root: Path) -> dict:
    """Train, export and register the digits model twice in `root` (components, in a child)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = root / "registered"
    if done.exists():
        return env  # --project: trained and registered by an earlier run
    shutil.copy(REPO / "params.yaml", root)
    script = (
        "import mlflow, torch\n"
        "from components.core import config, paths\n"
        "from components.data import datasets, prepare, validate\n"
        "from components.evaluation import evaluate\n"
        "from components.release import export, registry\n"
        "from components.training import train\n"
        "cfg = config.load('params.yaml')\n"
        "for step in (datasets, prepare, validate, train, evaluate, export, registry):\n"
        "    step.run(cfg)\n"
        # register reuses the version of a checkpoint it has seen: new bytes, the same model
        "checkpoint = torch.load(paths.CHECKPOINT, weights_only=True)\n"
        "checkpoint['spec']['copy'] = 2\n"
        "torch.save(checkpoint, paths.CHECKPOINT)\n"
        "version = registry.run(cfg).version\n"
        "name = cfg.registry.model_name\n"
        "mlflow.MlflowClient().set_registered_model_alias(name, 'champion', version)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=root, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    done.touch()
    return env


def _bodies(root: Path, env: dict) -> dict:
    """The first N_IMAGES test files as PNG bodies and as the JSON tensors MLflow takes."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    manifest = pd.read_parquet(root / "data/prepared/manifest.parquet")
    files = manifest.loc[manifest["split"] == "test", "path"].head(N_IMAGES)
    source = json.loads((root / "data/prepared/meta.json").read_text())["source"]
    pngs, tensors = [], []
    for i, relative in enumerate(files):
        png = root / source / relative
        pixels = np.asarray(Image.open(png).convert("L"))[None, None]  # [1, 1, H, W]
        tensor = root / "bodies" / f"{i}.json"
        tensor.parent.mkdir(exist_ok=True)
        tensor.write_text(json.dumps({"inputs": pixels.tolist()}))
        pngs.append(str(png))
        tensors.append(str(tensor))
    (root / "pngs.txt").write_text("\n".join(pngs) + "\n")
    (root / "tensors.txt").write_text("\n".join(tensors) + "\n")
    (root / "post.lua").write_text(LUA)
    return {"png": root / "pngs.txt", "json": root / "tensors.txt"}


def _start(
    root: Path, env: dict, name: str, port: int, poll: float = 10.0, workers: int = 1,
    settings: tuple[str, ...] = (), log_name: str = "",
) -> subprocess.Popen:  # fmt: skip
    if name == "lensflow":
        command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port),
                   "--poll-seconds", str(poll), "--workers", str(workers),
                   *[arg for setting in settings for arg in ("--set", setting)]]  # fmt: skip
    elif name == "mlflow":
        command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                   "models:/lensflow-classifier@champion", "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    else:
        (root / "bare_app.py").write_text(BARE)
        env = {**env, "BARE_ONNX": str(root / "models/model.onnx")}
        command = [sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1",
                   "--port", str(port), "--no-access-log", "--log-level", "warning"]  # fmt: skip
    log = open(root / f"{log_name or name}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=log)
    ready = "/ready" if name == "lensflow" else "/ping" if name == "mlflow" else "/predict"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=2)
            return process
        except urllib.error.HTTPError as exc:  # the bare app answers GET /predict with 405
            if exc.code == 405:
                return process
        except OSError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{name} did not start; see {root / f'{name}.log'}")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wrk(root: Path, port: int, bodies: Path, kind: str, connections: int, seconds: int,
         cpus: set[int] | None = None):  # fmt: skip
    path = "/invocations" if kind == "json" else "/predict"
    env = {**os.environ, "BENCH_BODIES": str(bodies),
           "BENCH_CONTENT_TYPE": "application/json" if kind == "json" else "image/png"}  # fmt: skip
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    command = [*pin, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout",
               "5s", "-s", str(root / "post.lua"), f"http://127.0.0.1:{port}{path}"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def _parse(output: str) -> dict:
    def number(pattern: str) -> float:
        found = re.search(pattern, output)
        return float(found.group(1)) if found else 0.0

    def latency_ms(percent: str) -> float:
        value, unit = re.search(rf"{percent}%\s+([\d.]+)(us|ms|s)", output).groups()
        return round(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], 2)

    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", output)  # fmt: skip
    return {
        "requests_per_s": round(number(r"Requests/sec:\s+([\d.]+)")),
        "requests": int(number(r"(\d+) requests in")),
        "p50_ms": latency_ms("50"),
        "p99_ms": latency_ms("99"),
        "errors": int(number(r"Non-2xx or 3xx responses: (\d+)"))
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }


def _measure(root: Path, env: dict, bodies: dict, seconds: int, rounds: int) -> dict:
    """Each server at each concurrency once per round, the three servers taking turns (all
    three running, idle but one), so that other work on a shared machine falls on all alike:
    {server: {concurrency: [one result per round]}}."""
    names = ("lensflow", "mlflow", "bare")
    ports = {name: _free_port() for name in names}
    processes = {}
    runs = {name: {str(c): [] for c in CONCURRENCY} for name in names}
    try:
        for name in names:
            processes[name] = _start(root, env, name, ports[name])
            kind = "json" if name == "mlflow" else "png"
            _wrk(root, ports[name], bodies[kind], kind, 4, 2).communicate()  # warm-up
        for _ in range(rounds):
            for connections in CONCURRENCY:
                for name in names:
                    kind = "json" if name == "mlflow" else "png"
                    cpu_before = _cpu_seconds(processes[name])
                    load = _wrk(root, ports[name], bodies[kind], kind, connections, seconds)
                    result = _parse(load.communicate()[0])
                    cpu = _cpu_seconds(processes[name]) - cpu_before
                    result["server_cpu_ms_per_request"] = round(
                        1000 * cpu / max(result["requests"], 1), 3
                    )
                    runs[name][str(connections)].append(result)
    finally:
        for process in processes.values():
            _stop(process)
    return runs


def _workers(root: Path, env: dict, bodies: dict, seconds: int, rounds: int) -> dict:
    """`--workers 1` and `--workers 2` at WORKERS_CONCURRENCY, taking turns; the median round
    of each, and the ratio of their requests/s."""
    counts = (1, 2)
    ports = {n: _free_port() for n in counts}
    processes, runs = {}, {n: [] for n in counts}
    try:
        for n in counts:
            processes[n] = _start(root, env, "lensflow", ports[n], workers=n)
            _wrk(root, ports[n], bodies["png"], "png", 4, 2).communicate()  # warm-up
        for _ in range(rounds):
            for n in counts:
                cpu_before = _cpu_seconds(processes[n])
                load = _wrk(root, ports[n], bodies["png"], "png", WORKERS_CONCURRENCY, seconds)
                result = _parse(load.communicate()[0])
                cpu = _cpu_seconds(processes[n]) - cpu_before
                result["server_cpu_ms_per_request"] = round(
                    1000 * cpu / max(result["requests"], 1), 3
                )
                runs[n].append(result)
    finally:
        for process in processes.values():
            _stop(process)
    median = {
        f"workers_{n}": sorted(r, key=lambda x: x["requests_per_s"])[len(r) // 2]
        for n, r in runs.items()
    }
    ratio = median["workers_2"]["requests_per_s"] / max(median["workers_1"]["requests_per_s"], 1)
    return {**median, "concurrency": WORKERS_CONCURRENCY, "ratio_2_vs_1": round(ratio, 2)}


def _hot_swap(root: Path, env: dict, bodies: dict, seconds: int) -> dict:
    """wrk at concurrency 4 while @champion flips between versions 1 and 2 every second, with
    two workers (each follows the alias on its own)."""
    import mlflow

    port = _free_port()
    process = _start(root, env, "lensflow", port, poll=0.2, workers=2)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    try:
        load = _wrk(root, port, bodies["png"], "png", 4, seconds)
        flips = 0
        for _ in range(seconds - 2):
            time.sleep(1.0)
            flips += 1
            version = "1" if flips % 2 else "2"
            client.set_registered_model_alias("lensflow-classifier", "champion", version)
        result = _parse(load.communicate()[0])
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        swaps = re.search(r"^lensflow_model_swaps_total ([\d.]+)", metrics, re.M).group(1)
    finally:
        _stop(process)
    exit_code = process.returncode
    return {"alias_flips": flips, "swaps_both_workers": int(float(swaps)) - 2, **result,
            "failed": result["errors"], "exit_code_after_sigterm": exit_code}  # fmt: skip


def _summary(
    runs: dict, workers: dict, swap: dict, load_before: float, seconds: int, wrk: str
) -> dict:
    ratios = {f"vs_{other}": _paired_ratios(runs, other) for other in ("mlflow", "bare")}
    results = {
        name: {
            c: sorted(r, key=lambda x: x["requests_per_s"])[len(r) // 2] for c, r in by_c.items()
        }
        for name, by_c in runs.items()
    }  # the median round of each server
    worst_p99 = max(r["p99_ms"] for r in results["lensflow"].values())
    meets = (
        min(ratios["vs_mlflow"].values()) >= TARGETS["vs_mlflow"]
        and min(ratios["vs_bare"].values()) >= TARGETS["vs_bare"]
        and worst_p99 <= TARGETS["p99_ms"]
        and swap["failed"] == TARGETS["swap_failures"]
        and workers["ratio_2_vs_1"] >= TARGETS["workers_2_vs_1"]
    )
    cpu = {
        name: {c: r["server_cpu_ms_per_request"] for c, r in by_c.items()}
        for name, by_c in results.items()
    }
    return {
        "bench": "serve_load",
        "load_generator": f"{wrk} -t1 -cN -d{seconds}s (loopback)",
        "cpus": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "images": N_IMAGES,
        "results": results,
        "ratios": ratios,
        "lensflow_worst_p99_ms": worst_p99,
        # requests/s move with whatever else runs on a shared machine; CPU per request hardly
        "server_cpu_ms_per_request": cpu,
        "workers": workers,
        "hot_swap": swap,
        "targets": TARGETS,
        "meets_targets": meets,
    }


def _paired_ratios(runs: dict, other: str) -> dict:
    """lensflow's requests/s over `other`'s, per concurrency: the median over the rounds of
    the ratio within a round (the two ran seconds apart), so that load that comes and goes on a
    shared machine cancels out instead of landing on one server's median."""
    ratios = {}
    for c, ours in runs["lensflow"].items():
        within = sorted(
            a["requests_per_s"] / max(b["requests_per_s"], 1)
            for a, b in zip(ours, runs[other][c], strict=True)
        )
        ratios[c] = round(within[len(within) // 2], 2)
    return ratios


def _cpu_seconds(process: subprocess.Popen, only: str | None = None) -> float:
    """User + system CPU time of the server and its children (mlflow models serve starts
    uvicorn in a child): per request, a measure that other work on the machine hardly moves.
    `only`: just the processes whose command line contains it."""
    import psutil

    root = psutil.Process(process.pid)
    total = 0.0
    for each in [root, *root.children(recursive=True)]:
        try:
            if only is not None and only not in " ".join(each.cmdline()):
                continue
            times = each.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
