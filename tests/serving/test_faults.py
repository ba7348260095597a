"""`lensflow serve` against a real `mlflow server` whose artifacts it serves (mlflow-artifacts),
reached directly or through a real HTTP proxy that answers 503 to chosen requests: transient
artifact failures are retried and the golden check is never skipped, a stopped registry fails
no prediction and shows in /model, two workers swap versions without a failed request, and
the documented claims on --int8, versions without golden inputs and serve.shutdown_timeout.

The server holds copies of the tiny project's version 1: version 1 (champion) and 2 (the same
artifacts), 3 (a run without golden inputs), 4 (an int8 variant shipped with it)."""

from __future__ import annotations

import http.client
import math
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import mlflow
import psutil
import pytest

from components.core import paths
from components.release import quantize
from serving.app import Service
from serving.follower import Follower
from serving.model import Source
from tests.servers import free_port, mlflow_server
from tests.serving.conftest import request, start_server
from tests.serving.test_server import PNG, Load, _metric, _until, _wait_for

FAST = ("serve.poll_seconds=0.2", "serve.registry_timeout_seconds=1")


class FlakyProxy:
    """A real HTTP hop to `upstream` that answers 503 to the first N requests whose path
    holds a given text (`fail(text, n)`), and forwards every other request as it came."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.rules: dict[str, int] = {}
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, text: str, times: int) -> None:
        with self.lock:
            self.rules[text] = times

    def _should_fail(self, path: str) -> bool:
        with self.lock:
            hit = [text for text, left in self.rules.items() if left > 0 and text in path]
            for text in hit:
                self.rules[text] -= 1
            if hit:
                self.failed.append(path)
            return bool(hit)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._should_fail(self.path):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body or None, headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture(scope="module")
def store(registered, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-served-artifacts")
    with mlflow_server(f"sqlite:///{folder / 'store.db'}", folder) as server:
        name = registered["name"]
        client = mlflow.MlflowClient(server.url, server.url)
        runs = _copy_version_1(registered, client, name, folder)
        client.set_registered_model_alias(name, "champion", "1")
        yield {**registered, "server": server, "client": client, "runs": runs, "folder": folder}


def _copy_version_1(registered, client, name: str, folder) -> dict:
    """Versions 1-4 on the server, from the sqlite registry's version 1 (see the docstring)."""
    local = mlflow.MlflowClient()  # the tiny project's own sqlite registry
    original = local.get_model_version(name, "1")
    (folder / "m").mkdir()
    (folder / "g").mkdir()
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(folder / "m"))
    golden = mlflow.artifacts.download_artifacts(
        f"runs:/{original.run_id}/{paths.GOLDEN_ARTIFACT}", dst_path=str(folder / "g")
    )
    int8 = folder / "int8" / paths.ONNX_INT8.name
    int8.parent.mkdir()
    calibration = quantize._calibration_images(registered["cfg"])
    quantize.quantize_onnx(paths.ONNX, int8, calibration, exclude_head=True)
    experiment = client.create_experiment("served-artifacts")
    client.create_registered_model(name)
    runs = {}
    for version, extras in ((1, ["golden"]), (2, []), (3, []), (4, ["golden", "int8"])):
        if version == 2:  # the same run and artifacts as version 1: another version number
            client.create_model_version(name, f"runs:/{runs[1]}/model", runs[1])
            continue
        run_id = client.create_run(experiment).info.run_id
        client.log_artifacts(run_id, model_dir, "model")
        if "golden" in extras:
            client.log_artifact(run_id, golden, "golden")
        if "int8" in extras:
            client.log_artifact(run_id, str(int8), "int8")
        tags = {"lensflow.int8": "shipped"} if "int8" in extras else {}
        found = client.create_model_version(name, f"runs:/{run_id}/model", run_id, tags=tags)
        assert found.version == str(version)
        runs[version] = run_id
    return runs


@pytest.fixture
def stopped():
    """Servers a test starts, killed at its end if still running."""
    processes = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def _png(store) -> bytes:
    return next((store["root"] / "data/raw/shapes").rglob("*.png")).read_bytes()


def test_an_onnx_file_that_cannot_be_read_yet_is_retried_then_served(registered, tmp_path):
    """A transient failure on an .onnx file (here: it is not there for a while, as when it is
    being copied in) is retried with backoff; the follower neither refuses it nor ends."""
    model_file = tmp_path / "model.onnx"
    away = tmp_path / "model.onnx.copying"
    away.write_bytes((registered["root"] / paths.ONNX).read_bytes())
    source = Source(str(model_file), file=str(model_file))
    settings = registered["cfg"].serve.model_copy(update={"poll_seconds": 0.05})
    service = Service(settings, source)
    follower = Follower(service, source)
    follower.start()
    try:
        _until(lambda: service.retrying and service.retrying["attempts"] >= 2, 10)
        assert service.model is None and service.refused is None and follower.is_alive()
        assert "FileNotFoundError" in service.retrying["reason"]
        away.replace(model_file)
        _until(lambda: service.model is not None, 10)
        assert service.model.version == "file" and service.refused is None
        assert service.retrying is None
        follower.join(5)
        assert not follower.is_alive()  # a file is followed until it is served
    finally:
        follower.stop.set()
        service.pool.shutdown()


def test_a_flaky_artifact_store_delays_a_pinned_version_and_never_skips_its_golden_check(
    store, stopped
):
    proxy = FlakyProxy(store["server"].url)
    proxy.fail("/mlflow-artifacts/", 2)  # the model's download, twice
    proxy.fail("golden", 2)  # then the golden file's listing or download, twice
    port = free_port()
    pinned = f"models:/{store['name']}/1"
    process = start_server(
        store["root"], port, *FAST, tracking_uri=proxy.url, args=["--model", pinned], ready=False
    )
    stopped.append(process)
    info = _wait_for(port, lambda info: info["served"] is not None)
    assert len(proxy.failed) == 4 and sum("golden" in path for path in proxy.failed) == 2
    assert info["served"]["golden"]["status"] == "passed" and info["refused"] is None
    assert _metric(port, "lensflow_model_load_failures_total") == 4
    assert math.isnan(_metric(port, "lensflow_registry_up"))  # pinned: no alias to look up
    assert request(port, "POST", "/predict", _png(store), PNG)[1]["model_version"] == "1"


def test_the_registry_stopped_for_5_s_fails_no_prediction_and_shows_in_model(store, stopped):
    server, port = store["server"], free_port()
    process = start_server(store["root"], port, *FAST, tracking_uri=server.url)
    stopped.append(process)
    with Load(port, _png(store)) as load:
        _until(lambda: len(load.results) >= 10)
        os.killpg(server.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            info = _wait_for(port, lambda info: info["registry"]["reachable"] is False, 5)
            assert _metric(port, "lensflow_registry_up") == 0
            time.sleep(max(0.0, 5 - (time.monotonic() - stopped_at)))  # the outage lasts 5 s
        finally:
            os.killpg(server.pid, signal.SIGCONT)
        _wait_for(port, lambda info: info["registry"]["reachable"] is True)
    assert {status for status, _ in load.results} == {200} and len(load.results) > 20
    assert info["registry"]["last_ok"] and info["registry"]["unreachable_since"]
    assert info["served"]["version"] == "1"
    assert _metric(port, "lensflow_registry_up") == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log = process.stdout.read()
    assert log.count("WARNING") == 1 and log.count("the registry is unreachable") == 1
    assert log.count("the registry answers again") == 1 and "Traceback" not in log


def _versions(port: int) -> list[float]:
    text = request(port, "GET", "/metrics")[1]
    return [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("lensflow_model_version{")]  # fmt: skip


def test_a_hot_swap_with_two_workers_fails_no_request_and_metrics_add_up(store, stopped):
    client, name, port = store["client"], store["name"], free_port()
    client.set_registered_model_alias(name, "champion", "1")
    process = start_server(
        store["root"], port, *FAST, tracking_uri=store["server"].url, args=["--workers", "2"]
    )
    stopped.append(process)
    _until(lambda: _versions(port) == [1.0, 1.0], what="two workers serving version 1")
    with Load(port, _png(store), threads=4) as load:
        _until(lambda: len(load.results) >= 20)
        client.set_registered_model_alias(name, "champion", "2")
        _until(lambda: _versions(port) == [2.0, 2.0], what="both workers on version 2")
        swapped = len(load.results)
        _until(lambda: len(load.results) >= swapped + 20)
    assert {status for status, _ in load.results} == {200}
    versions = [version for _, version in load.results]
    assert versions[0] == "1" and versions[-1] == "2"
    answered = 'lensflow_requests_total{endpoint="/predict",status="200"}'
    assert _metric(port, answered) == len(load.results)  # both workers' counts, summed
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "Traceback" not in process.stdout.read()


def test_workers_shut_down_when_their_supervisor_is_killed(registered, stopped):
    """SIGKILL to the supervisor of two workers: they get a SIGTERM of their own, shut down
    gracefully and free the port, instead of serving on as orphans."""
    port = free_port()
    process = start_server(registered["root"], port, *FAST, args=["--workers", "2"])
    stopped.append(process)
    workers = psutil.Process(process.pid).children()
    assert len(workers) == 2
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]
    with socket.create_server(("127.0.0.1", port)):  # no worker holds the port
        pass
    assert "Traceback" not in process.stdout.read()


def test_int8_a_version_without_golden_inputs_and_the_shutdown_timeout(store, stopped):
    name, url, png = store["name"], store["server"].url, _png(store)
    port = free_port()
    # the 2-epoch model's int8 (tagged shipped here, past quantize's gates) flips one of the
    # 8 golden images on some CPUs (0.875 on an AMD EPYC): 0.75 keeps this a test of serving
    agreement = "serve.int8_min_agreement=0.75"
    int8 = start_server(
        store["root"],
        port,
        *FAST,
        agreement,
        tracking_uri=url,
        args=["--model", f"models:/{name}/4", "--int8"],
    )
    stopped.append(int8)
    served = request(port, "GET", "/model")[1]["served"]
    assert served["variant"] == "int8" and served["int8"] == "served"
    assert served["golden"]["status"] == "passed"
    int8_answer = request(port, "POST", "/predict?top_k=10", png, PNG)[1]
    int8.kill()

    port = free_port()
    settings = (*FAST, "serve.shutdown_timeout=1", "serve.body_timeout_seconds=60")
    plain = start_server(
        store["root"], port, *settings, tracking_uri=url, args=["--model", f"models:/{name}/3"]
    )
    stopped.append(plain)
    served = request(port, "GET", "/model")[1]["served"]
    assert served["golden"]["status"] == "missing" and served["variant"] == "fp32"
    answer = request(port, "POST", "/predict?top_k=10", png, PNG)[1]
    assert answer["model_version"] == "3"
    assert answer["predictions"] != int8_answer["predictions"]  # int8 was another model

    # a request whose body never arrives keeps nothing alive past serve.shutdown_timeout
    from tests.serving.test_server import _reading, _slow_upload

    stuck = _slow_upload(port, png)
    _reading(port, 1)
    start = time.monotonic()
    plain.send_signal(signal.SIGTERM)
    plain.wait(timeout=30)
    assert time.monotonic() - start < 5  # 1 s of grace, not the 60 s body deadline
    stuck.close()
    assert "Traceback" not in plain.stdout.read()
