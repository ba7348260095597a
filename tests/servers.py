"""Real servers for tests, started on 127.0.0.1 and stopped afterwards.

MLflow: `mlflow server` as lensflow's stacks start it (infra.stack.mlflow_server), on any
backend store, artifacts served from a folder.

PostgreSQL: a throwaway cluster (`initdb` + `pg_ctl`) on a free loopback port, trust
authentication for the user `lensflow`. As root the server binaries refuse to run, so they run
as the `postgres` user, in a data directory that user owns (not pytest's tmp_path: under root
that is mode 0700 inside root's folder). Where PostgreSQL is not installed the tests that need
it skip with the reason, unless LENSFLOW_REQUIRE_POSTGRES=1 (set by .ci/run) makes them fail.

Prefect: `prefect server start` with an auth string, as the team stack runs it: its clients
get the string from `client_env()` / `settings()`.

nginx: Debian's package, with a self-signed certificate, in front of any of them with the
team stack's own configuration (infra/nginx/lensflow.conf.template); tests that need it skip
with the reason where it is not installed.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

REQUIRE_POSTGRES = "LENSFLOW_REQUIRE_POSTGRES"
PG_USER = "lensflow"


def stop_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to a server started in its own session and its children; SIGKILL after
    `timeout` seconds."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The folder of `initdb` and `pg_ctl` (Debian keeps them off PATH), or None."""
    if shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidate = Path(bindir.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass(frozen=True)
class Postgres:
    bindir: Path
    port: int
    as_user: tuple[str, ...]  # ("runuser", "-u", "postgres", "--") when run as root

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL, e.g. driver "postgresql+asyncpg" for Prefect."""
        return f"{driver}://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its postgresql:// URL."""
        command = [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        subprocess.run([*command, "-U", PG_USER, name], check=True, capture_output=True)
        return self.url(name)


def _skip_or_fail(reason: str):
    if os.environ.get(REQUIRE_POSTGRES) == "1":
        pytest.fail(f"{reason} ({REQUIRE_POSTGRES}=1)")
    pytest.skip(reason)


@contextmanager
def postgres_server():
    """A running PostgreSQL cluster, removed on exit (skips or fails when it cannot start)."""
    bindir = postgres_bindir()
    if bindir is None:
        _skip_or_fail("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_user: tuple[str, ...] = ()
    folder = Path(tempfile.mkdtemp(prefix="lensflow-pg-"))
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        os.chown(folder, postgres.pw_uid, postgres.pw_gid)
        as_user = ("runuser", "-u", "postgres", "--")
    data, log, port = folder / "data", folder / "server.log", free_port()
    server = Postgres(bindir, port, as_user)
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        initdb = [*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER]
        subprocess.run(initdb, check=True, capture_output=True)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run(
            [*pg_ctl, "-o", options, "-l", str(log), "-w", "start"], capture_output=True, text=True
        )
        if started.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else started.stderr
            _skip_or_fail(f"PostgreSQL did not start: {tail}")
        yield server
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class PrefectServer:
    port: int
    log: Path
    auth_string: str  # PREFECT_SERVER_API_AUTH_STRING: a client without it gets 401

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a subprocess that uses this server (a `lensflow` command, a
        worker): this worktree's code first on PYTHONPATH, PREFECT_API_URL and
        PREFECT_API_AUTH_STRING set."""
        repo = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
        return {
            **os.environ,
            "PYTHONPATH": path,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_AUTH_STRING": self.auth_string,
            **extra,
        }

    @contextmanager
    def settings(self):
        """In this process: Prefect clients talk to this server while inside."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        values = {PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.auth_string}
        with temporary_settings(values):
            yield


@contextmanager
def prefect_server(database_url: str, folder: Path, timeout: float = 120.0):
    """`prefect server start` on a free loopback port with its database at `database_url`
    (postgresql+asyncpg://…), its PREFECT_HOME in `folder`, a new auth string; stopped on
    exit."""
    import signal
    import time
    import urllib.request

    from infra.stack import prefect_server_command

    port, log, auth_string = free_port(), folder / "prefect-server.log", secrets.token_urlsafe()
    command, env = prefect_server_command(port, folder / "home", database_url, auth_string)
    env["PREFECT_UI_ENABLED"] = "false"  # no UI build at start: the tests use the API only
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    server = PrefectServer(port, log, auth_string)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{server.api_url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Prefect server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield server
    finally:
        for signum, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, signum)
                process.wait(wait)
                break
            except (OSError, subprocess.TimeoutExpired):
                continue


@dataclass(frozen=True)
class MlflowServer:
    url: str  # the tracking URI: http://127.0.0.1:PORT
    backend_store: str
    artifacts: Path
    log: Path
    pid: int = 0  # its process group leader: os.killpg(pid, SIGSTOP) stops it, workers too


@contextmanager
def mlflow_server(
    backend_store: str, folder: Path, timeout: float = 180.0, auth_env: dict | None = None
):
    """`mlflow server` on `backend_store`, artifacts served from folder/artifacts, its log in
    folder/mlflow.log; stopped (with its workers) on exit. `auth_env`: with authentication
    (--app-name basic-auth), this environment (infra.accounts.server_env)."""
    from infra.stack import mlflow_server as command_of

    port = free_port()
    command, env = command_of(backend_store, str(folder / "artifacts"), port, auth=bool(auth_env))
    env = {**env, **(auth_env or {})}
    log = folder / "mlflow.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,  # its own group: stopping it stops its workers too
        )
    server = MlflowServer(
        f"http://127.0.0.1:{port}", backend_store, folder / "artifacts", log, process.pid
    )
    try:
        _wait_healthy(server, process, timeout)
        yield server
    finally:
        stop_group(process)


def _wait_healthy(server: MlflowServer, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = server.log.read_text()[-3000:]
            raise RuntimeError(f"mlflow server did not come up on {server.url}: {tail}")
        time.sleep(0.3)


def nginx_binary() -> str | None:
    return shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")


def self_signed(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `name` and 127.0.0.1 and its key, as a lab makes them
    (docs/team.md): (certificate, key)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextmanager
def nginx_proxy(folder: Path, values: dict[str, str], timeout: float = 30.0):
    """nginx on a free loopback port with the team stack's proxy configuration, its ${…}
    filled from `values` (host names, upstreams) and a self-signed certificate for
    localhost. Yields (port, certificate). Skips where nginx is not installed."""
    from string import Template

    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed(folder)
    port = free_port()
    template = Path(__file__).resolve().parents[1] / "infra/nginx/lensflow.conf.template"
    filled = {
        "PROXY_LISTEN": f"127.0.0.1:{port}", "NGINX_RESOLVER": "127.0.0.1",
        "TLS_CERTIFICATE": str(cert), "TLS_CERTIFICATE_KEY": str(key), **values,
    }  # fmt: skip
    (folder / "lensflow.conf").write_text(Template(template.read_text()).safe_substitute(filled))
    temp = "\n".join(
        f"  {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (folder / "nginx.conf").write_text(
        f"worker_processes 1;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'};\n"
        f"events {{}}\nhttp {{\n  access_log {folder / 'access.log'};\n{temp}\n"
        f"  include {folder / 'lensflow.conf'};\n}}\n"
    )
    command = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e",
               str(folder / "error.log"), "-g", "daemon off;"]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                log = folder / "error.log"
                pytest.fail(
                    f"nginx did not start: {log.read_text()[-2000:] if log.exists() else ''}"
                )
            time.sleep(0.1)
        yield port, cert
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


LABEL_STUDIO_VENV = "LENSFLOW_LABEL_STUDIO_VENV"  # default: <repo>/.label-studio-venv


@dataclass(frozen=True)
class LabelStudio:
    url: str
    token: str  # the admin's legacy API token (LABEL_STUDIO_API_KEY)
    log: Path
    personal_token: str = ""  # the admin's personal access token (Label Studio's default kind)


@contextmanager
def label_studio_server(venv: Path, folder: Path, document_root: Path, timeout: float = 300.0):
    """`label-studio start` from its own venv (make label-studio-venv), offline
    (LATEST_VERSION_CHECK=false), on 127.0.0.1 and a free port, its data in `folder`, local
    files served from `document_root`, with an admin whose API token it returns."""
    port, token = free_port(), "lensflow-test-" + os.urandom(8).hex()
    env = {
        **os.environ,
        "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_BASE_DATA_DIR": str(folder),
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        # the admin's token below is a legacy token, off by default for a new organisation
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    }
    command = [
        str(venv / "bin" / "label-studio"), "start", "--no-browser",
        "--internal-host", "127.0.0.1", "--port", str(port),
        "--username", "reviewer@example.com", "--password", "lensflow-test", "--user-token", token,
    ]  # fmt: skip
    log = folder / "label-studio.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=folder, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
    server = LabelStudio(f"http://127.0.0.1:{port}", token, log)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(f"{server.url}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield replace(server, personal_token=_personal_token(server))
    finally:
        stop_group(process)


def _personal_token(server: LabelStudio) -> str:
    """A personal access token for the admin, made through the REST API as a user makes one
    in Account & Settings (the legacy token authenticates the request)."""
    headers = {"Authorization": f"Token {server.token}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"{server.url}/api/token/", b"{}", headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["token"]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False
