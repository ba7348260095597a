"""One tiny trained project for the tests of tests/serving (package scope), registered three
times into its sqlite MLflow store: version 1 (champion), version 2 (broken: its weights
changed after its golden inputs were written, so it fails the golden check), version 3 (the
same good model as version 1)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch

from components.core import config, paths
from components.data import datasets, prepare, validate
from components.evaluation import evaluate
from components.release import export, registry
from components.training import train
from tests.conftest import REPO, tiny_project


@pytest.fixture(scope="package")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    with tiny_project(root):
        # a model that answers consistently is all serving needs: few epochs, few corruptions
        cfg = config.load("params.yaml", ["train.epochs=2", "evaluate.robustness_images=20"])
        datasets.run(cfg)
        prepare.run(cfg)
        assert validate.run(cfg).success
        train.run(cfg)
        evaluate.run(cfg)
        export.run(cfg)
        good = paths.ONNX.read_bytes()
        assert registry.run(cfg).version == "1"
        _scale_weights(paths.ONNX)  # golden.npz still holds the good model's probabilities
        _as_another_checkpoint(2)
        assert registry.run(cfg).version == "2"
        paths.ONNX.write_bytes(good)
        _as_another_checkpoint(3)
        assert registry.run(cfg).version == "3"
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(cfg.registry.model_name, "champion", "1")
        yield {"root": root, "cfg": cfg, "name": cfg.registry.model_name}


def _as_another_checkpoint(copy: int) -> None:
    """register reuses the version of a checkpoint it has seen: new bytes, the same model."""
    checkpoint = torch.load(paths.CHECKPOINT, weights_only=True)
    checkpoint["spec"]["copy"] = copy
    torch.save(checkpoint, paths.CHECKPOINT)


def _scale_weights(path: Path) -> None:
    proto = onnx.load(path)
    weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    array = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(array * 0.5, weight.name))
    onnx.save(proto, path)


def start_server(
    root: Path, port: int, *settings: str, tracking_uri: str = "", args=(), ready: bool = True
) -> subprocess.Popen:
    """`lensflow serve` as a real process in `root` (its sqlite registry unless tracking_uri
    says otherwise), returned once it answers /ready (or, ready=False, once it answers)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{root}/mlflow.db",
    }
    settings = ("serve.workers=1", *settings)  # one process unless a test asks for more
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), *overrides, *args]
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wanted = (200,) if ready else (200, 503)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if request(port, "GET", "/ready")[0] in wanted:
                return process
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"lensflow serve never got ready: {process.stdout.read()}")


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, JSON or text body, headers) of one request on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read().decode()
        content_type = response.getheader("content-type", "")
        parsed = json.loads(data) if content_type.startswith("application/json") else data
        return response.status, parsed, dict(response.getheaders())
    finally:
        connection.close()
