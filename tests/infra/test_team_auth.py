"""The team stack's accounts against real servers, without Docker: MLflow with its built-in
authentication (`--app-name basic-auth`) on the session PostgreSQL, its accounts made by the
stack's own setup job (`python -m infra.accounts`), behind nginx with TLS (the stack's proxy
configuration, a self-signed certificate) where nginx is installed, else directly.

`pipeline` runs `lensflow run` end to end (it registers and promotes); `serving` serves and
predicts with the champion but may not move an alias nor read other experiments; a client
without an account gets 401."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from infra import accounts
from tests.conftest import write_tiny_params
from tests.servers import free_port, mlflow_server, nginx_binary, nginx_proxy

MODEL = "lensflow-classifier"
PREFECT_NAME = "prefect.lensflow.test"  # the proxy's other routes, by host name
NOWHERE = "127.0.0.1:9"


def _lensflow(project: Path, env: dict, *args: str, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def team(postgres, prefect_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("team-auth")
    store = postgres.create_database("mlflow_team")
    users = postgres.create_database("mlflow_team_users")
    admin = accounts.generate()
    config = accounts.write_config(folder / "auth/basic_auth.ini", users)
    server_env = accounts.server_env(config, admin, accounts.generate())
    project = folder / "project"
    project.mkdir()
    write_tiny_params(project)
    with mlflow_server(store, folder, auth_env=server_env) as server, contextlib.ExitStack() as on:
        url, cert, proxy = server.url, None, None
        if nginx_binary():
            routes = {
                "MLFLOW_HOSTNAME": "localhost", "MLFLOW_UPSTREAM": server.url.split("//")[1],
                "PREFECT_HOSTNAME": PREFECT_NAME,
                "PREFECT_UPSTREAM": f"127.0.0.1:{prefect_server.port}",
                "SERVE_HOSTNAME": "predict.lensflow.test", "SERVE_UPSTREAM": NOWHERE,
                "S3_HOSTNAME": "s3.lensflow.test", "S3_UPSTREAM": NOWHERE, "SERVE_MAX_BODY": "10m",
            }  # fmt: skip
            port, cert = on.enter_context(nginx_proxy(folder / "nginx", routes))
            url, proxy = f"https://localhost:{port}", {"port": port, "folder": folder / "nginx"}
        passwords = {role: accounts.generate() for role in accounts.ROLES}
        team = {"url": url, "cert": cert, "proxy": proxy, "project": project, "admin": admin,
                "passwords": passwords, "server": server}  # fmt: skip

        def env(account: str | None, **extra: str) -> dict[str, str]:
            """A client's environment: this account (None: none), the proxy's certificate."""
            found = prefect_server.client_env(
                MLFLOW_TRACKING_URI=url, PREFECT_HOME=str(project / ".prefect"),
                DVC_SITE_CACHE_DIR=str(project / ".dvc-site-cache"), **extra,
            )  # fmt: skip
            for name in ("USERNAME", "PASSWORD"):
                found.pop(f"MLFLOW_TRACKING_{name}", None)
            if account:
                password = admin if account == accounts.ADMIN else passwords[account]
                found |= {"MLFLOW_TRACKING_USERNAME": account, "MLFLOW_TRACKING_PASSWORD": password}
            if cert:
                found["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(cert)
            return found

        team["env"] = env
        setup_env = env(accounts.ADMIN, **{
            f"MLFLOW_{role.upper()}_PASSWORD": passwords[role] for role in accounts.ROLES
        })  # fmt: skip
        team["setup"] = subprocess.run(
            [sys.executable, "-m", "infra.accounts"],
            cwd=project, env=setup_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        team["run"] = _lensflow(
            project,
            env("pipeline"),
            "run",
            "--set",
            "train.epochs=1",
            "--set",
            "evaluate.robustness_images=20",
        )
        yield team


def _client(team: dict, monkeypatch, account: str | None) -> mlflow.MlflowClient:
    """An MLflow client in this process as `account` (None: anonymous)."""
    for key, value in team["env"](account).items():
        if key.startswith("MLFLOW_TRACKING_"):
            monkeypatch.setenv(key, value)
    if account is None:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return mlflow.MlflowClient(team["url"])


def _status(call) -> int:
    with pytest.raises(MlflowException) as refused:
        call()
    return refused.value.get_http_status_code()


def test_the_setup_job_makes_the_accounts_and_pipeline_runs_end_to_end(team, monkeypatch):
    setup, run = team["setup"], team["run"]
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert "accounts pipeline, serving: ready on" in setup.stdout
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    client = _client(team, monkeypatch, "pipeline")
    champion = client.get_model_version_by_alias(MODEL, "champion")  # registered, promoted
    experiment = client.get_experiment_by_name("lensflow")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert {"train", "evaluate", "export", "register"} <= {
        r.data.tags.get("lensflow.step") for r in runs
    }
    assert champion.run_id in {r.info.run_id for r in runs}
    for secret in (team["admin"], *team["passwords"].values()):
        assert secret not in run.stdout + run.stderr + setup.stdout + setup.stderr


def test_without_an_account_moving_the_champion_is_401(team, monkeypatch):
    client = _client(team, monkeypatch, None)
    assert _status(lambda: client.set_registered_model_alias(MODEL, "champion", "1")) == 401
    assert _status(lambda: client.get_registered_model(MODEL)) == 401


def test_serving_reads_the_champion_but_may_not_move_it_nor_read_other_experiments(
    team, monkeypatch
):
    client = _client(team, monkeypatch, "serving")
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert client.get_run(champion.run_id).info.status == "FINISHED"
    assert _status(lambda: client.set_registered_model_alias(MODEL, "champion", "1")) == 403
    assert _status(lambda: client.delete_registered_model_alias(MODEL, "champion")) == 403
    promotions = _client(team, monkeypatch, "pipeline").get_experiment_by_name(
        "lensflow-promotions"
    )
    client = _client(team, monkeypatch, "serving")
    assert _status(lambda: client.get_experiment(promotions.experiment_id)) == 403
    assert client.search_runs([promotions.experiment_id]) == []  # its runs are not shown
    refused = _lensflow(
        team["project"], team["env"]("serving"), "promote", "--break-lock", "--reason", "test"
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(
        "lensflow: error: the MLflow server refused account 'serving' (HTTP 403)"
    )


def test_serving_runs_lensflow_predict_and_serve(team):
    project, env = team["project"], team["env"]("serving")
    images = sorted((project / "data/raw").rglob("*.png"))[:3]
    predict = _lensflow(project, env, "predict", *map(str, images), "--out", "served")
    assert predict.returncode == 0, predict.stderr[-3000:]
    table = pd.read_csv(project / "served/predictions.csv")
    assert len(table) == 3 and set(table["model_version"].astype(str)) == {"1"}

    port = free_port()
    command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--workers", "1"]
    serve = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        status, body = _ready(serve, port)
        assert (status, json.loads(body)) == (200, {"ready": True, "model_version": "1"})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request(
            "POST", "/predict", images[0].read_bytes(), {"Content-Type": "image/png"}
        )
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def _ready(serve: subprocess.Popen, port: int, timeout: float = 120) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        assert serve.poll() is None, serve.stdout.read()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ready")
            answer = connection.getresponse()
            status, body = answer.status, answer.read()
            if status == 200 or time.monotonic() > deadline:
                return status, body
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def test_nginx_with_tls_routes_by_host_name(team, prefect_server):
    if team["proxy"] is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx): MLflow was direct")
    assert team["url"].startswith("https://localhost:")
    port, folder = team["proxy"]["port"], team["proxy"]["folder"]
    log = (folder / "access.log").read_text()
    assert "POST /api/2.0/mlflow/runs/create" in log  # `lensflow run` went through it
    context = ssl.create_default_context(cafile=str(team["cert"]))

    def get(path: str, host: str) -> int:
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        try:
            connection.request("GET", path, headers={"Host": host})
            return connection.getresponse().status
        finally:
            connection.close()

    assert get("/health", "localhost") == 200  # MLflow
    assert get("/api/health", PREFECT_NAME) == 200  # Prefect, by its name
    assert get("/api/flows/filter", PREFECT_NAME) == 401  # its auth string is still asked
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        get("/health", "unknown.example")  # any other name: no answer
    with pytest.raises(ssl.SSLCertVerificationError):  # TLS only with the certificate
        untrusted = ssl.create_default_context()
        connection = http.client.HTTPSConnection("localhost", port, context=untrusted, timeout=10)
        connection.request("GET", "/health")
    assert os.stat(team["cert"]).st_size > 0


def test_the_admin_adds_an_account_and_rotates_its_password(team, monkeypatch, tmp_path):
    import stat

    env = team["env"]
    added = _lensflow(tmp_path, env(accounts.ADMIN), "account", "add", "alice", "--role", "serving")
    assert added.returncode == 0, added.stderr[-3000:]
    secret = tmp_path / ".lensflow/auth/alice"
    assert added.stdout.strip() == (
        f"account alice added with role serving; its password is in {secret.relative_to(tmp_path)}"
        " (only you can read it)"
    )
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    first = secret.read_text()
    assert first not in added.stdout + added.stderr

    def champion_as_alice(password: str):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return mlflow.MlflowClient(team["url"]).get_model_version_by_alias(MODEL, "champion")

    _client(team, monkeypatch, "serving")  # the certificate, no retries
    assert champion_as_alice(first).version == "1"
    rotated = _lensflow(tmp_path, env(accounts.ADMIN), "account", "password", "alice")
    assert rotated.returncode == 0, rotated.stderr[-3000:]
    assert secret.read_text() != first
    assert _status(lambda: champion_as_alice(first)) == 401
    assert champion_as_alice(secret.read_text()).version == "1"

    refused = _lensflow(tmp_path, env("serving"), "account", "add", "bob", "--role", "pipeline")
    assert refused.returncode == 2 and "account 'serving' may not call" in refused.stderr
    assert not (tmp_path / ".lensflow/auth/bob").exists()
