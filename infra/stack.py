"""The local stack: an MLflow tracking server and a Prefect server on 127.0.0.1, started as
detached processes of the project (`lensflow stack up|down|status`).

State (PIDs, ports, log files) lives in `.lensflow/stack.json`; logs in `.lensflow/logs/`.
`up --auth`: MLflow with its accounts (infra/accounts.py) and Prefect with an auth string,
their secrets in `.lensflow/auth/` (files only the user can read).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from components.core import tracking
from components.core.errors import UserError
from infra import accounts

HOST = "127.0.0.1"
STATE_DIR = Path(".lensflow")
STATE_FILE = STATE_DIR / "stack.json"
LOG_DIR = STATE_DIR / "logs"
PREFECT_HOME = STATE_DIR / "prefect"
HEALTH_PATH = {"mlflow": "/health", "prefect": "/api/health"}
STOP_TIMEOUT_S = 10.0


@dataclass
class Server:
    name: str
    pid: int
    started: float  # seconds after boot (components/core/tracking.py): a reused PID is not ours
    port: int
    log: str
    auth: bool = False  # started by `up --auth`

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def process(self) -> psutil.Process | None:
        """The running server process, or None when it is gone."""
        try:
            return tracking.find_process(self.pid, self.started)
        except psutil.Error:
            return None

    def orphans(self) -> list[psutil.Process]:
        """Processes of the server's group (it leads its own session) that outlived it: the
        `uvicorn` of an `mlflow server` killed with SIGKILL, say. None while a living process
        holds its PID: the server itself (down stops its group), or a newer process, which the
        OS gives that PID only once no group has it as its ID any more."""
        try:
            if tracking.find_process(self.pid, None) is not None:
                return []
        except psutil.Error:
            return []
        found = []
        for process in psutil.process_iter():
            try:
                if (
                    os.getpgid(process.pid) == self.pid
                    and tracking.started_after_boot(process) >= self.started
                ):
                    found.append(process)
            except (OSError, psutil.Error):
                continue
        return found

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + HEALTH_PATH[self.name], timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False


def exports(servers: dict[str, Server]) -> list[str]:
    """The shell lines that point lensflow at the servers; with auth, as the `pipeline`
    account and with Prefect's auth string, read from their files by the shell (no secret
    is printed)."""
    lines = [
        f"export MLFLOW_TRACKING_URI={servers['mlflow'].url}",
        f"export PREFECT_API_URL={servers['prefect'].url}/api",
    ]
    if servers["mlflow"].auth:
        folder = accounts.AUTH_DIR.resolve()
        lines[1:1] = [
            "export MLFLOW_TRACKING_USERNAME=pipeline",
            f'export MLFLOW_TRACKING_PASSWORD="$(cat {shlex.quote(str(folder / "pipeline"))})"',
        ]
        lines.append(
            f'export PREFECT_API_AUTH_STRING="$(cat {shlex.quote(str(folder / "prefect"))})"'
        )
    return lines


def up(
    mlflow_port: int | None = None,
    prefect_port: int | None = None,
    timeout: float = 180.0,
    auth: tuple[str, str] | None = None,
) -> tuple[dict[str, Server], bool]:
    """Start both servers unless they already run; wait until both answer. Returns the
    servers and whether they were started now. `auth` (experiment, registered model):
    with authentication, the accounts `pipeline` and `serving` granted on those."""
    running = read_state()
    if running and all(server.process() for server in running.values()):
        if running["mlflow"].auth != (auth is not None):
            have = "with" if running["mlflow"].auth else "without"
            raise UserError(
                f"the stack runs {have} authentication: lensflow stack down, then up again"
            )
        return running, False
    if running:  # one of them died: stop what is left, start both afresh
        down()
    ports = {"mlflow": _port("mlflow", mlflow_port), "prefect": _port("prefect", prefect_port)}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    servers = {name: _start(name, port, auth is not None) for name, port in ports.items()}
    _write_state(servers)
    try:
        _wait_healthy(servers, timeout)
        if auth is not None:
            admin = accounts.Admin.login(
                servers["mlflow"].url, password=accounts.read_secret(_secret("admin"))
            )
            passwords = {role: accounts.secret(_secret(role)) for role in accounts.ROLES}
            accounts.bootstrap(admin, passwords, *auth)
    except BaseException:  # not up in time, or Ctrl-C while waiting: leave nothing running
        down()
        raise
    return servers, True


def _secret(name: str) -> Path:
    return accounts.AUTH_DIR / name


def status() -> dict[str, dict]:
    """{name: {pid, url, running, healthy, log}} of the recorded servers ({} when none)."""
    return {
        name: {
            "pid": server.pid,
            "url": server.url,
            "running": server.process() is not None,
            "healthy": server.healthy(),
            "log": server.log,
        }
        for name, server in read_state().items()
    }


def down() -> list[str]:
    """Stop the recorded servers and their child processes (SIGTERM, then SIGKILL after
    STOP_TIMEOUT_S) and remove the state. Returns the names of the servers stopped."""
    stopped = []
    for name, server in read_state().items():
        process = server.process()
        if process is not None:
            _stop_tree(process)
            stopped.append(name)
        for orphan in server.orphans():
            _stop_tree(orphan)
    STATE_FILE.unlink(missing_ok=True)
    return stopped


def read_state() -> dict[str, Server]:
    if not STATE_FILE.exists():
        return {}
    try:
        recorded = json.loads(STATE_FILE.read_text())
        servers = {name: Server(**fields) for name, fields in recorded.items()}
    except (ValueError, TypeError) as exc:
        raise UserError(f"{STATE_FILE}: not a stack state file ({exc}); delete it") from exc
    boot = psutil.boot_time()
    for server in servers.values():
        if server.started > boot:  # a stack started by an older lensflow: a wall-clock time
            server.started = round(server.started - boot, 2)
    return servers


def _write_state(servers: dict[str, Server]) -> None:
    STATE_DIR.mkdir(exist_ok=True)
    partial = STATE_FILE.with_suffix(".json.tmp")
    partial.write_text(json.dumps({name: asdict(s) for name, s in servers.items()}, indent=2))
    partial.replace(STATE_FILE)


def _port(name: str, wanted: int | None) -> int:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, wanted or 0))
        except OSError as exc:
            raise UserError(f"{name} port {wanted} on {HOST} is in use ({exc.strerror})") from exc
        return sock.getsockname()[1]


def _command(name: str, port: int, auth: bool) -> tuple[list[str], dict[str, str]]:
    project = Path.cwd()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if name == "prefect":
        auth_string = accounts.secret(_secret("prefect")) if auth else None
        return prefect_server_command(port, project / PREFECT_HOME, auth_string=auth_string)
    artifacts = project / "mlartifacts"
    command, server_env = mlflow_server(
        f"sqlite:///{project / 'mlflow.db'}", str(artifacts), port, local_root=artifacts, auth=auth
    )
    if auth:  # the users in .lensflow/auth/users.db; passwords made on the first `up --auth`
        config = accounts.write_config(
            _secret("basic_auth.ini"), f"sqlite:///{(_secret('users.db')).resolve()}"
        )
        server_env |= accounts.server_env(
            config.resolve(), accounts.secret(_secret("admin")), accounts.secret(_secret("key"))
        )
    return command, {**env, **server_env}


def prefect_server_command(
    port: int, home: Path, database_url: str | None = None, auth_string: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """`prefect server start` on HOST:port and its environment: its own PREFECT_HOME, its
    database at `database_url` (e.g. postgresql+asyncpg://…) or else sqlite in that home, and
    with `auth_string` only clients that send it (PREFECT_API_AUTH_STRING) get in."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(home)}
    # the UI calls 4200 unless told where its API is
    env["PREFECT_UI_API_URL"] = f"http://{HOST}:{port}/api"
    env.pop("PREFECT_API_URL", None)  # a server of its own, not a client of another
    env.pop("PREFECT_API_AUTH_STRING", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
            "--port", str(port)], env  # fmt: skip


def mlflow_server(
    backend_store: str,
    artifacts: str,
    port: int,
    host: str = HOST,
    allowed_hosts: str | None = None,
    local_root: Path | None = None,
    auth: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command of every lensflow tracking server (this stack, the team
    stack of docker-compose.yml, the tests on PostgreSQL) and the environment it adds: a
    backend store (`sqlite:///…` or `postgresql://…`), artifacts served by the server from
    `artifacts` (a folder or `s3://bucket/prefix`), one worker. `allowed_hosts`: the Host
    headers it answers besides localhost and private addresses (e.g. a container's name).

    `local_root` (the local stack): the experiments the server creates keep their artifacts
    at this folder's file: URI, which lensflow without a server reads and writes as well, so
    the stack and the direct mode share a project in either order. Without it they get
    `mlflow-artifacts:/…` locations, which only a server resolves (a team's clients have no
    access to its bucket). Experiments made that way still work through the server.

    `auth`: MLflow's own authentication (`--app-name basic-auth`); the caller adds the
    environment of infra.accounts.server_env."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store,
        "--artifacts-destination", artifacts,
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    if local_root is not None:
        command += ["--default-artifact-root", local_root.resolve().as_uri()]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    if auth:
        command += ["--app-name", "basic-auth"]
    # job execution starts a job runner with many workers that stops slowly (STACK.md)
    return command, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _start(name: str, port: int, auth: bool = False) -> Server:
    command, env = _command(name, port, auth)
    log = LOG_DIR / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this command; Ctrl-C in the shell spares it
        )
    started = tracking.started_after_boot(psutil.Process(process.pid))
    return Server(name, process.pid, started, port, str(log), auth)


def _wait_healthy(servers: dict[str, Server], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = dict(servers)
    while waiting:
        for name, server in list(waiting.items()):
            if server.healthy():
                del waiting[name]
            elif server.process() is None:
                raise UserError(f"{name} server exited at start; {_log_tail(server)}")
        if waiting and time.monotonic() > deadline:
            name, server = next(iter(waiting.items()))
            raise UserError(
                f"{name} server did not answer {server.url}{HEALTH_PATH[name]} within "
                f"{timeout:.0f} s; {_log_tail(server)}"
            )
        time.sleep(0.3)


def _log_tail(server: Server, lines: int = 5) -> str:
    try:
        tail = [line.strip() for line in Path(server.log).read_text().splitlines() if line.strip()]
    except OSError:
        tail = []
    return f"last lines of {server.log}: " + (" | ".join(tail[-lines:]) or "(empty)")


def _stop_tree(process: psutil.Process) -> None:
    try:
        tree = [process, *process.children(recursive=True)]
    except psutil.Error:
        return
    for member in tree:
        _signal(member, "terminate")
    # the server leads its own process group: this also reaches a child it forked just now
    _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(_alive(member) for member in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    for member in tree:
        if _alive(member):
            _signal(member, "kill")
    _signal_group(process.pid, signal.SIGKILL)


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except OSError:  # the group is empty: everyone has exited
        pass


def _signal(process: psutil.Process, how: str) -> None:
    try:
        getattr(process, how)()
    except psutil.Error:
        pass


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a detached server's parent may never reap it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
