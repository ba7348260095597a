"""`lensflow stack up|status|down` with real servers: one stack for the module, a tiny
`lensflow run` against it with the environment `up` printed (no temporary Prefect server),
its runs in the MLflow server and its flow run in the Prefect server, and no process left
after `down`. The stack and the direct mode share the project in either order: the stack
writes into an experiment the direct mode made, and after `down` the direct mode runs on
what the stack made."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from components.core import tracking
from infra import stack as lensflow_stack
from tests.conftest import REPO, write_tiny_params

LENSFLOW = [sys.executable, "-m", "cli.main"]
MADE_DIRECTLY = "made-without-the-stack"  # an experiment the direct mode made before `up`


def _lensflow(project, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*LENSFLOW, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


def _alive(pid: int, started: float) -> bool:
    return tracking.find_process(pid, started) is not None


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    project = tmp_path_factory.mktemp("stack-project")
    write_tiny_params(project)
    found = {"project": project}
    with pytest.MonkeyPatch.context() as direct:  # as `lensflow` without a server makes it
        direct.chdir(project)
        direct.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        tracking.experiment_named(MADE_DIRECTLY, tracking.LOCAL_ARTIFACTS)
    try:
        found["up"] = up = _lensflow(project, "stack", "up")
        assert up.returncode == 0, up.stderr[-3000:]
        found["state"] = json.loads((project / ".lensflow/stack.json").read_text())
        found["processes"] = {
            (p.pid, tracking.started_after_boot(p))
            for server in found["state"].values()
            for p in [psutil.Process(server["pid"])]
            + psutil.Process(server["pid"]).children(recursive=True)
        }
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in up.stdout.splitlines()
            if line.startswith("export ")
        )
        found["exports"] = exports
        env = {
            **os.environ,
            **exports,
            "PYTHONPATH": str(REPO),
            "PREFECT_HOME": str(project / ".prefect-client"),
            "DVC_SITE_CACHE_DIR": str(project / ".dvc-site-cache"),
        }
        found["run"] = _lensflow(project, "run", env=env)
        found["validate_into_direct"] = _lensflow(
            project, "stage", "validate", "--set", f"tracking.experiment={MADE_DIRECTLY}", env=env
        )
        found["up_again"] = _lensflow(project, "stack", "up")
        found["status"] = _lensflow(project, "stack", "status")
        yield found
    finally:
        _lensflow(project, "stack", "down", timeout=120)  # always: no server outlives the tests


def test_up_prints_both_uis_and_the_environment_to_export(stack):
    state, exports = stack["state"], stack["exports"]
    assert exports == {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{state['mlflow']['port']}",
        "PREFECT_API_URL": f"http://127.0.0.1:{state['prefect']['port']}/api",
    }
    for server in state.values():
        assert f"http://127.0.0.1:{server['port']}" in stack["up"].stdout.splitlines()[0]
        assert (stack["project"] / server["log"]).exists()
    for path in ("/health", "/api/health"):
        url = exports["MLFLOW_TRACKING_URI" if path == "/health" else "PREFECT_API_URL"]
        url = url.removesuffix("/api") + path
        assert urllib.request.urlopen(url, timeout=5).status == 200
    assert (stack["project"] / ".lensflow/prefect").is_dir()  # its own PREFECT_HOME


def test_run_against_the_stack_logs_to_both_servers_without_a_temporary_server(stack):
    run = stack["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "temporary server" not in run.stdout + run.stderr
    client = mlflow.MlflowClient(stack["exports"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("lensflow")
    runs = client.search_runs([experiment.experiment_id])
    assert {"training", "train", "evaluate"} <= {r.info.run_name for r in runs}
    assert {r.info.status for r in runs} == {"FINISHED"}
    # at a file location the direct mode reads too, not mlflow-artifacts:/ (a server's only)
    folder = stack["project"] / "mlartifacts" / experiment.experiment_id
    assert experiment.artifact_location == folder.as_uri()
    assert all(r.info.artifact_uri.startswith(f"{folder.as_uri()}/") for r in runs)
    assert any(folder.rglob("*.onnx"))

    api = stack["exports"]["PREFECT_API_URL"]
    flows = {f["id"]: f["name"] for f in _post(f"{api}/flows/filter", {})}
    flow_runs = _post(f"{api}/flow_runs/filter", {})
    assert [(flows[r["flow_id"]], r["state_type"]) for r in flow_runs] == [
        ("lensflow-training", "COMPLETED")
    ]


def test_up_twice_starts_no_second_copy(stack):
    again = stack["up_again"]
    assert again.returncode == 0 and again.stdout.startswith("# already running")
    assert json.loads((stack["project"] / ".lensflow/stack.json").read_text()) == stack["state"]


def test_status_names_each_server_by_pid_and_health(stack):
    status = stack["status"]
    assert status.returncode == 0, status.stdout
    lines = status.stdout.splitlines()
    for line, (name, server) in zip(lines, stack["state"].items(), strict=True):
        assert line.startswith(f"{name}: ") and f"pid {server['pid']}" in line
        assert "healthy" in line


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _lensflow(tmp_path, "stack", "up", "--mlflow-port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"lensflow: error: mlflow port {port} on 127.0.0.1 is in use (Address already in use)"
    )
    assert not (tmp_path / ".lensflow/stack.json").exists()


def test_a_server_that_does_not_come_up_in_time_is_one_line_with_its_log_and_exit_2(tmp_path):
    result = _lensflow(tmp_path, "stack", "up", "--timeout", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("lensflow: error: mlflow server did not answer http://127.0.0.1:")
    assert "within 1 s; last lines of .lensflow/logs/mlflow.log: " in line
    assert not (tmp_path / ".lensflow/stack.json").exists()
    left = [p.pid for p in psutil.process_iter() if _cwd(p) == str(tmp_path)]
    assert left == []  # what was started is stopped again


SERVER_WITH_A_WORKER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
time.sleep(600)
"""


def test_down_stops_the_workers_a_server_killed_outright_left_behind(tmp_path, monkeypatch):
    # as `mlflow server` does: the server starts its worker (uvicorn) and waits for it
    leader = subprocess.Popen([sys.executable, "-c", SERVER_WITH_A_WORKER], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(leader.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        [worker] = psutil.Process(leader.pid).children()
        worker_started = tracking.started_after_boot(worker)
        started = tracking.started_after_boot(psutil.Process(leader.pid))
        monkeypatch.chdir(tmp_path)
        server = lensflow_stack.Server("mlflow", leader.pid, started, 1, "log")
        lensflow_stack._write_state({"mlflow": server})
        leader.kill()
        leader.wait()
        assert _alive(worker.pid, worker_started)

        assert lensflow_stack.down() == []  # the server itself was gone
        assert not _alive(worker.pid, worker_started)
        assert not (tmp_path / ".lensflow/stack.json").exists()
    finally:
        leader.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)  # whatever is left of its group
        leader.wait()


def _cwd(process: psutil.Process) -> str | None:
    try:
        return None if process.status() == psutil.STATUS_ZOMBIE else process.cwd()
    except psutil.Error:
        return None


def test_the_stack_writes_into_an_experiment_the_direct_mode_made(stack):
    validate = stack["validate_into_direct"]
    assert validate.returncode == 0, validate.stderr[-3000:]
    client = mlflow.MlflowClient(stack["exports"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(MADE_DIRECTLY)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert "validation/validation.json" in logged, logged
    folder = stack["project"] / "mlartifacts" / run.info.run_id
    assert experiment.artifact_location == (stack["project"] / "mlartifacts").as_uri()
    assert (folder / "artifacts/validation/validation.json").exists()  # the direct mode's place


def test_down_stops_every_process_and_removes_the_state(stack):
    # the fixture's teardown runs `down` again, a no-op then
    started = stack["processes"] | {
        (child.pid, tracking.started_after_boot(child))
        for server in stack["state"].values()
        for child in psutil.Process(server["pid"]).children(recursive=True)
    }
    result = _lensflow(stack["project"], "stack", "down", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "stopped: mlflow, prefect"
    assert [pid for pid, after_boot in started if _alive(pid, after_boot)] == []
    assert not (stack["project"] / ".lensflow/stack.json").exists()
    status = _lensflow(stack["project"], "stack", "status")
    assert status.returncode == 1 and status.stdout.startswith("not running")


def test_after_down_the_direct_mode_runs_on_what_the_stack_made(stack):
    """`lensflow stage export` and `lensflow stage register` without a server, on the project,
    experiment and registered model that the stack's run made (both log artifacts: export's
    ONNX model, register's model version)."""
    project = stack["project"]
    _lensflow(project, "stack", "down", timeout=120)  # after the test above; alone, too
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(project / ".prefect-direct"),
        "DVC_SITE_CACHE_DIR": str(project / ".dvc-site-cache"),
    }
    for server in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(server, None)
    since = int(time.time() * 1000)
    export = _lensflow(project, "stage", "export", env=env)
    assert export.returncode == 0, export.stderr[-3000:]
    register = _lensflow(project, "stage", "register", env=env)
    assert register.returncode == 0, register.stderr[-3000:]

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lensflow")
    direct = client.search_runs([experiment.experiment_id], f"attributes.start_time > {since}")
    names = [r.info.run_name for r in direct]
    assert sorted(names) == ["export", "register"]
    assert {r.info.status for r in direct} == {"FINISHED"}
    for run in direct:
        local = Path(run.info.artifact_uri.removeprefix("file://"))
        assert local.is_relative_to(project / "mlartifacts"), run.info.artifact_uri


def test_up_with_auth_keeps_its_secrets_in_files_only_the_user_reads(tmp_path, monkeypatch):
    """What `lensflow stack up --auth` starts, without starting it: MLflow with its accounts
    (the same auth config as the team stack's), Prefect with an auth string, the secrets in
    .lensflow/auth/ (0600 in a 0700 folder), and export lines that read them from there."""
    import stat

    monkeypatch.chdir(tmp_path)
    command, env = lensflow_stack._command("mlflow", 5000, auth=True)
    assert command[-2:] == ["--app-name", "basic-auth"]
    folder = tmp_path / ".lensflow/auth"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(folder / "basic_auth.ini")
    assert "NO_PERMISSIONS" in (folder / "basic_auth.ini").read_text()
    prefect_command, prefect_env = lensflow_stack._command("prefect", 4200, auth=True)
    secrets = {
        "admin": env["MLFLOW_AUTH_ADMIN_PASSWORD"],
        "key": env["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        "prefect": prefect_env["PREFECT_SERVER_API_AUTH_STRING"],
    }
    assert len(set(secrets.values())) == 3 and min(map(len, secrets.values())) >= 32
    for name, secret in secrets.items():
        assert (folder / name).read_text() == secret
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    again = lensflow_stack._command("mlflow", 5000, auth=True)[1]
    assert again["MLFLOW_AUTH_ADMIN_PASSWORD"] == secrets["admin"]  # made once, then kept

    servers = {
        name: lensflow_stack.Server(name, 1, 0.0, port, "log", auth=True)
        for name, port in (("mlflow", 5000), ("prefect", 4200))
    }
    (folder / "pipeline").write_text("pipeline-password")
    exports = "\n".join(lensflow_stack.exports(servers))
    assert "export MLFLOW_TRACKING_USERNAME=pipeline" in exports
    assert f'MLFLOW_TRACKING_PASSWORD="$(cat {folder / "pipeline"})"' in exports
    assert f'PREFECT_API_AUTH_STRING="$(cat {folder / "prefect"})"' in exports
    assert not any(secret in exports for secret in [*secrets.values(), "pipeline-password"])
    shell = subprocess.run(
        ["bash", "-c", f"{exports}\necho $MLFLOW_TRACKING_PASSWORD $PREFECT_API_AUTH_STRING"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shell.stdout.split() == ["pipeline-password", secrets["prefect"]]
