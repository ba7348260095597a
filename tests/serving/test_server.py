"""`lensflow serve` as a real process on a free loopback port, against a real sqlite registry:
every 4xx path, limits applied before reading or decoding, slow clients, a client that goes
away, a hot swap under load, a broken version refused, SIGTERM. The tests run in file order on
one server; the SIGTERM test ends it. They wait by polling what the server reports (/model,
/metrics, a refused connection), never by sleeping."""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.components.data.test_validation_corpus import png_header_only
from tests.servers import free_port
from tests.serving.conftest import request, start_server

LIMITS = (
    "serve.poll_seconds=0.2",
    "serve.max_upload_bytes=100000",
    "serve.max_pixels=1000000",
    "serve.max_request_pixels=2000000",
    "serve.max_images=4",
    "serve.max_in_flight=3",
    "serve.max_reading=5",
    "serve.header_timeout_seconds=2",
    "serve.body_timeout_seconds=5",
    "serve.retry_after_seconds=2",
)


@pytest.fixture(scope="module")
def server(registered):
    port = free_port()
    process = start_server(registered["root"], port, *LIMITS)
    files = sorted((registered["root"] / "data/raw/shapes").rglob("*.png"))[::30]
    yield {**registered, "port": port, "process": process, "pngs": [f.read_bytes() for f in files]}
    if process.poll() is None:
        process.kill()
    process.wait()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart(files: list[tuple[str, bytes]], boundary: str = "lensflowtest") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


MULTIPART = {"Content-Type": "multipart/form-data; boundary=lensflowtest"}
PNG = {"Content-Type": "image/png"}


def test_predicts_raw_bytes_and_multipart_with_the_version(server):
    port, pngs = server["port"], server["pngs"]
    status, body, _ = request(port, "POST", "/predict?top_k=2", pngs[0], PNG)
    assert status == 200 and body["model_version"] == "1"
    (prediction,) = body["predictions"]
    assert len(prediction["top_k"]) == 2
    assert prediction["top_k"][0]["probability"] >= prediction["top_k"][1]["probability"]
    files = [("a.png", pngs[0]), ("b.png", pngs[1])]
    status, body, _ = request(port, "POST", "/predict", _multipart(files), MULTIPART)
    assert status == 200 and [p["image"] for p in body["predictions"]] == ["a.png", "b.png"]
    assert body["predictions"][0]["top_k"][0] == prediction["top_k"][0]  # same image, same answer
    assert len(body["predictions"][1]["top_k"]) == 3  # serve.top_k
    assert request(port, "GET", "/health")[0] == 200
    assert request(port, "GET", "/ready")[1] == {"ready": True, "model_version": "1"}


@pytest.mark.parametrize(
    ("status", "body", "headers", "says"),
    [
        (415, b"hello", {"Content-Type": "text/plain"}, "Content-Type text/plain"),
        (415, b"name,label\n", PNG, "not a supported image format"),
        (400, b"", PNG, "empty"),
        (400, "TRUNCATED", PNG, "cannot be decoded"),
        (400, b"\x89PNG\r\n\x1a\n" + b"\0" * 40, PNG, "header cannot be read"),
        (400, "NO_FILE", MULTIPART, "no file"),
        (400, "BAD_TOP_K", PNG, "top_k"),
        (400, "SUPERSCRIPT_TOP_K", PNG, "top_k"),
        (413, b"\x89PNG\r\n\x1a\n" + b"\0" * 100_001, PNG, "max_upload_bytes"),
        (413, "BIG_PNG", PNG, "max_pixels"),
        (413, "FIVE_IMAGES", MULTIPART, "max_images"),
    ],
)
def test_every_bad_request_gets_one_json_error(server, status, body, headers, says):
    png = server["pngs"][0]
    path = {"BAD_TOP_K": "/predict?top_k=0", "SUPERSCRIPT_TOP_K": "/predict?top_k=%C2%B2"}
    path = path.get(body, "/predict") if isinstance(body, str) else "/predict"
    body = {
        "TRUNCATED": png[: len(png) // 2],
        "NO_FILE": b'--lensflowtest\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
        b"--lensflowtest--\r\n",
        "BAD_TOP_K": png,
        "SUPERSCRIPT_TOP_K": png,
        "BIG_PNG": _png(1001, 1000),
        "FIVE_IMAGES": _multipart([(f"{i}.png", png) for i in range(5)]),
    }.get(body, body)
    answer, error, _ = request(server["port"], "POST", path, body, headers)
    assert answer == status and error["error"]["status"] == status
    assert says in error["error"]["message"] and "Traceback" not in str(error)
    assert error["model_version"] == "1"


def test_unknown_paths_and_methods_answer_json(server):
    assert request(server["port"], "GET", "/nothing")[1]["error"]["status"] == 404
    assert request(server["port"], "GET", "/predict")[1]["error"]["status"] == 405


class Load:
    """Threads posting images one after another until stopped: statuses and versions seen."""

    def __init__(self, port: int, png: bytes, threads: int = 2):
        self.port, self.png, self.results = port, png, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._post) for _ in range(threads)]

    def _post(self):
        while not self.stop.is_set():
            status, body, _ = request(self.port, "POST", "/predict", self.png, PNG)
            self.results.append((status, body.get("model_version")))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def _wait_for(port: int, check, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = request(port, "GET", "/model")[1]
        if check(info):
            return info
        time.sleep(0.1)
    raise AssertionError(f"/model never got there: {info}")


def _metric(port: int, name: str) -> float:
    text = request(port, "GET", "/metrics")[1]
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_hot_swap_under_load_then_a_broken_version_is_refused(server):
    port, name = server["port"], server["name"]
    client = mlflow.MlflowClient()
    with Load(port, server["pngs"][0]) as load:
        _until(lambda: len(load.results) >= 10)
        client.set_registered_model_alias(name, "champion", "3")
        _wait_for(port, lambda info: info["served"]["version"] == "3")
        swapped = len(load.results)
        _until(lambda: len(load.results) >= swapped + 10)
        client.set_registered_model_alias(name, "champion", "2")  # fails its golden check
        info = _wait_for(port, lambda info: info["refused"] is not None)
        refused = len(load.results)
        _until(lambda: len(load.results) >= refused + 10)
    assert info["served"]["version"] == "3" and info["refused"]["version"] == "2"
    assert "golden check failed" in info["refused"]["reason"]
    statuses = {status for status, _ in load.results}
    versions = [version for _, version in load.results]
    assert statuses == {200} and len(load.results) > 20
    assert versions[0] == "1" and versions[-1] == "3" and "2" not in versions
    assert _metric(port, "lensflow_model_version") == 3
    assert _metric(port, "lensflow_model_refusals_total") == 1
    assert _metric(port, 'lensflow_model_refused_info{reason="golden check failed')
    assert request(port, "POST", "/predict", server["pngs"][0], PNG)[1]["model_version"] == "3"


def _until(condition, seconds: float = 30, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {seconds} s")


def _metric_or_0(port: int, name: str) -> float:
    text = request(port, "GET", "/metrics")[1]
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)), 0)


def _reading(port: int, count: int) -> None:
    """Wait until the server says `count` request bodies are being read."""
    _until(lambda: _metric(port, "lensflow_reading") == count, what=f"{count} bodies reading")


def _raw(port: int, data: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(data)
    return connection


def _slow_upload(port: int, png: bytes) -> socket.socket:
    """A request whose body is half sent: its headers are in, its body is not."""
    head = "POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
    return _raw(port, f"{head}Content-Length: {len(png)}\r\n\r\n".encode() + png[:10])


def _answer(connection: socket.socket, seconds: float = 30) -> tuple[str, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    connection.settimeout(seconds)
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    connection.close()
    return answer.decode(), time.monotonic() - start


def _finish(connection: socket.socket, png: bytes) -> str:
    connection.sendall(png[10:])
    connection.settimeout(30)
    answer = b""
    while b"model_version" not in answer:
        chunk = connection.recv(65536)
        if not chunk:
            break
        answer += chunk
    connection.close()
    return answer.decode()


def test_a_body_over_the_limit_is_refused_from_its_headers_before_it_is_read(server):
    head = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
    connection = _raw(server["port"], head + b"Content-Length: 1000000000\r\n\r\n")
    answer, seconds = _answer(connection, seconds=5)  # and then closes: no body is awaited
    assert answer.startswith("HTTP/1.1 413") and "max_upload_bytes" in answer
    assert seconds < 1


def test_pixel_bombs_are_refused_from_their_headers_before_decoding(server):
    """Header-only PNGs: decoding any of them would fail (400); the answer is the 413."""
    port = server["port"]
    for side in (10_000, 100_000):  # under and over Pillow's own bomb limit (179M pixels)
        status, error, _ = request(port, "POST", "/predict", png_header_only(side, side), PNG)
        assert status == 413 and "serve.max_pixels" in error["error"]["message"]
    three = _multipart([(f"{i}.png", png_header_only(1000, 1000)) for i in range(3)])
    status, error, _ = request(port, "POST", "/predict", three, MULTIPART)
    assert status == 413 and "serve.max_request_pixels" in error["error"]["message"]
    status, error, _ = request(port, "POST", "/predict", png_header_only(1000, 1000), PNG)
    assert status == 400 and "cannot be decoded" in error["error"]["message"]


def test_slow_uploads_do_not_lock_out_complete_requests(server):
    port, png = server["port"], server["pngs"][0]
    waiting = [_slow_upload(port, png) for _ in range(3)]  # serve.max_in_flight=3
    _reading(port, 3)
    start = time.monotonic()
    assert request(port, "POST", "/predict", png, PNG)[0] == 200
    assert time.monotonic() - start < 1
    assert _metric(port, "lensflow_in_flight") == 0
    assert all(_finish(c, png).startswith("HTTP/1.1 200") for c in waiting)


def test_bodies_being_read_have_their_own_bound_503_with_retry_after(server):
    port, png = server["port"], server["pngs"][0]
    waiting = [_slow_upload(port, png) for _ in range(5)]  # serve.max_reading=5
    _reading(port, 5)
    start = time.monotonic()
    status, body, headers = request(port, "POST", "/predict", png, PNG)
    assert status == 503 and headers["retry-after"] == "2" and time.monotonic() - start < 1
    assert "5 request bodies being read" in body["error"]["message"]
    assert all(_finish(c, png).startswith("HTTP/1.1 200") for c in waiting)
    assert request(port, "POST", "/predict", png, PNG)[0] == 200


def test_headers_and_bodies_have_deadlines(server):
    port, png = server["port"], server["pngs"][0]
    errors_408 = 'lensflow_request_errors_total{endpoint="/predict",status="408"}'
    before = _metric_or_0(port, errors_408)
    headers_only = _raw(port, b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Ty")
    answer, seconds = _answer(headers_only)  # serve.header_timeout_seconds=2: closed
    assert answer == "" and 1.5 < seconds < 10
    answer, seconds = _answer(_slow_upload(port, png))  # serve.body_timeout_seconds=5
    assert answer.startswith("HTTP/1.1 408") and "body_timeout_seconds" in answer
    assert 4.5 < seconds < 15
    assert _metric(port, errors_408) == before + 1


def test_a_client_that_goes_away_is_counted_499_never_5xx(server):
    port, png = server["port"], server["pngs"][0]
    gone = 'lensflow_request_errors_total{endpoint="/predict",status="499"}'
    before = _metric_or_0(port, gone)
    connection = _slow_upload(port, png)
    _reading(port, 1)
    connection.close()
    _until(lambda: _metric_or_0(port, gone) == before + 1, what="a 499 counted")
    server_errors = 'lensflow_request_errors_total{endpoint="/predict",status="500"}'
    assert _metric_or_0(port, server_errors) == 0
    assert _metric(port, "lensflow_reading") == 0  # the server log's check is in the SIGTERM test


def test_past_max_in_flight_a_complete_request_gets_503_at_once(registered):
    """Requests held in a 3 s micro-batch window are in flight (their bodies are in): the
    fourth finds serve.max_in_flight=3 taken."""
    port, png = free_port(), next((registered["root"] / "data/raw/shapes").rglob("*.png"))
    settings = ("serve.max_in_flight=3", "serve.batch_max=8", "serve.batch_wait_ms=3000")
    good = ["--model", f"models:/{registered['name']}/3"]  # whatever @champion is by now
    process = start_server(registered["root"], port, *settings, args=good)
    try:
        answers = []
        posts = [
            threading.Thread(
                target=lambda: answers.append(
                    request(port, "POST", "/predict", png.read_bytes(), PNG)[0]
                )  # fmt: skip
            )
            for _ in range(3)
        ]
        for post in posts:
            post.start()
        _until(lambda: _metric(port, "lensflow_in_flight") == 3, what="3 requests in flight")
        start = time.monotonic()
        status, body, headers = request(port, "POST", "/predict", png.read_bytes(), PNG)
        assert status == 503 and "3 requests in progress" in body["error"]["message"]
        assert time.monotonic() - start < 1 and "retry-after" in headers
        for post in posts:
            post.join()
        assert answers == [200, 200, 200]
    finally:
        process.kill()
        process.wait()


def test_health_answers_while_a_big_request_decodes(registered):
    """16 RGB images of 2048² (64M pixels, ~200 MB decoded in turn) go to the pool: /health
    keeps answering meanwhile, as it could not if they decoded on the event loop."""
    port, good = free_port(), ["--model", f"models:/{registered['name']}/3"]
    process = start_server(registered["root"], port, args=good)
    ramp = np.add.outer(np.arange(2048), np.arange(2048)) % 256
    buffer = io.BytesIO()
    Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], -1).astype(np.uint8)).save(buffer, "PNG")
    body = _multipart([(f"{i}.png", buffer.getvalue()) for i in range(16)])
    try:
        answer, waits = [], []
        big = threading.Thread(
            target=lambda: answer.append(request(port, "POST", "/predict", body, MULTIPART))
        )
        big.start()
        _until(lambda: _metric(port, "lensflow_in_flight") == 1, what="the big request in flight")
        while big.is_alive():
            start = time.monotonic()
            assert request(port, "GET", "/health")[0] == 200
            waits.append(time.monotonic() - start)
        big.join()
        assert answer[0][0] == 200 and len(answer[0][1]["predictions"]) == 16
        assert len(waits) >= 5 and max(waits) < 0.5, waits
    finally:
        process.kill()
        process.wait()


def test_batch_scoring_gives_the_service_answers_and_lists_unreadable_files(server, tmp_path):
    from cli import main as cli

    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, png in enumerate(server["pngs"][:3]):
        (folder / f"{i}.png").write_bytes(png)
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes(server["pngs"][0][:60])
    out = tmp_path / "out"
    # the alias points to version 2, which fails its golden check: nothing is scored with it
    assert cli.main(["predict", str(folder), "--out", str(out)]) == 2
    assert not out.exists()
    uri = f"models:/{server['name']}/3"
    assert cli.main(["predict", str(folder), "--model", uri, "--out", str(out)]) == 0

    table = pd.read_parquet(out / "predictions.parquet")
    assert list(table.columns) == ["path", "class", "confidence", "model_version"]
    assert table["path"].tolist() == [str(folder / f"{i}.png") for i in range(3)]
    assert set(table["model_version"]) == {"3"}
    assert pd.read_csv(out / "predictions.csv", dtype={"model_version": str}).equals(table)
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["path"].tolist() == [str(folder / "cut.png"), str(folder / "notes.png")]
    assert "not a supported image format" in skipped["reason"].iloc[1]
    for png, row in zip(server["pngs"], table.itertuples(), strict=False):
        top = request(server["port"], "POST", "/predict", png, PNG)[1]["predictions"][0]["top_k"][0]
        assert (top["class"], top["probability"]) == (row[2], row[3])


def test_sigterm_answers_the_requests_in_flight_then_exits_0(server):
    port, png, process = server["port"], server["pngs"][0], server["process"]
    waiting = [_slow_upload(port, png) for _ in range(2)]
    _reading(port, 2)
    process.send_signal(signal.SIGTERM)
    _until(lambda: _refused(port), what="connections refused after SIGTERM")
    answers = [_finish(c, png) for c in waiting]
    assert all(a.startswith("HTTP/1.1 200") for a in answers)
    assert [json.loads(a.partition("\r\n\r\n")[2])["model_version"] for a in answers] == ["3"] * 2
    assert process.wait(timeout=30) == 0
    log = process.stdout.read()  # all the server logged, the client that went away included
    assert "Traceback" not in log
    assert all("version 2 refused" in line for line in log.splitlines() if " ERROR " in line)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_registered_signature_takes_images_of_any_size(registered):
    """What `mlflow models serve` checks its JSON tensors against: any height and width."""
    model = mlflow.pyfunc.load_model(f"models:/{registered['name']}/1")
    for height, width in ((16, 16), (9, 23)):
        out = model.predict(np.zeros((1, 3, height, width), np.uint8))
        assert out["probabilities"].shape == (1, 10)
