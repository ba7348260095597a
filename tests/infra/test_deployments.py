"""The Prefect deployments (flows/deployments.py) against a real Prefect server on PostgreSQL:
`lensflow schedule` serves them, `lensflow deploy` sends them to the `lensflow` work pool where
a worker runs them, and `run_deployment` (the monitoring flow's retrain trigger) starts one.

The tests run in file order: the schedule test serves (and, stopping, pauses) the deployments
that `lensflow deploy` then takes over.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from cli import main as cli
from tests.conftest import REPO, tiny_project, write_tiny_params

TRAINING = "lensflow-training/training"
MONITORING = "lensflow-continuous-validation/continuous-validation"
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def deploy_project(tmp_path_factory) -> Path:
    """A tiny project folder holding the flows (a link to this worktree's flows/)."""
    root = tmp_path_factory.mktemp("deploy-project")
    with tiny_project(root):
        (root / "flows").symlink_to(REPO / "flows")
        yield root


def _env(server, project: Path, **extra: str) -> dict[str, str]:
    return server.client_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        DVC_SITE_CACHE_DIR=str(project / ".dvc-site-cache"),
        PREFECT_RUNNER_POLL_FREQUENCY="2",  # how often a served deployment polls for runs
        PREFECT_WORKER_QUERY_SECONDS="2",  # how often a worker polls for runs
        COLUMNS="200",  # `prefect deployment ls` does not cut names short
        **extra,
    )


def _lensflow(args: list[str], server, project: Path, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=project,
        env=_env(server, project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _deployment(server, name: str):
    """The deployment `name` on the server, or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with server.settings(), get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, _ = process.communicate()
            pytest.fail(f"exited ({process.returncode}) before {what}: {out[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout} s")
        time.sleep(0.5)


def _stop(process: subprocess.Popen, timeout: float = 120, kill: bool = False) -> tuple[int, str]:
    """SIGTERM (unless it has exited); its exit code and output. `kill`: SIGKILL it if it has
    not ended after `timeout` seconds, for a process whose exit the test does not check."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if not kill:
            raise
        process.kill()
        out, _ = process.communicate()
    return process.returncode, out or ""


def _expected_deployments() -> set[str]:
    return {TRAINING, MONITORING}


def test_definitions_take_their_schedules_from_params():
    from components.core import config
    from flows import deployments

    cfg = config.from_dict(
        {"schedule": {"training": {"interval": 3600, "overrides": ["train.epochs=3"]}}}
    )
    training, monitoring = deployments.definitions(cfg, "p.yaml")
    assert (training.full_name, training.entrypoint) == (
        TRAINING,
        "flows/training.py:training_flow",
    )
    assert training.parameters == {"params_path": "p.yaml", "overrides": ["train.epochs=3"]}
    assert training.describe() == f"{TRAINING}: every 3600 s"

    assert (monitoring.full_name, monitoring.entrypoint) == (
        MONITORING,
        "flows/monitoring.py:continuous_validation_flow",
    )
    assert monitoring.parameters == {
        "params_path": "p.yaml",
        "data": "data/incoming",
        "model": None,
        "overrides": [],
    }
    assert monitoring.describe() == f"{MONITORING}: cron '0 6 * * *' (UTC)"


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        (["schedule", "--set", "schedule.training.cron=0 3 * *"], "'schedule.training.cron'"),
        (
            ["schedule", "--set", "schedule.training.cron=0 3 * * *"]
            + ["--set", "schedule.training.interval=60"],
            "'schedule.training': Value error, set cron or interval, not both",
        ),
        (["schedule", "--set", "train.epochs=3"], "only schedule.* keys here"),
        (
            ["schedule", "--set", "schedule.training.overrides=[train.epoch=3]"],
            "schedule.training.overrides: params.yaml: unknown key 'train.epoch'",
        ),
        (["deploy"], "lensflow deploy needs the Prefect server its workers poll"),
    ],
)
def test_bad_schedule_input_is_one_line_exit_2(project, capsys, command, problem):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    write_tiny_params(project)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server: nothing starts
        assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err, err


def test_schedule_serves_the_deployments_that_prefect_lists(prefect_server, deploy_project, capsys):
    serving = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "schedule"],
        cwd=deploy_project,
        env=_env(prefect_server, deploy_project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # listed, and polled by the serving process: the deployments are its now
        _wait_for(
            lambda: all(
                (d := _deployment(prefect_server, name)) is not None and d.last_polled
                for name in _expected_deployments()
            ),
            "serving",
            serving,
        )
        listed = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "ls"],
            env=_env(prefect_server, deploy_project),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        for name in _expected_deployments():
            assert name in listed.stdout
        training = _deployment(prefect_server, TRAINING)
        assert training.work_pool_name is None and not training.paused
        assert training.parameters == {"params_path": "params.yaml", "overrides": []}

        # never both: deploying what a running `lensflow schedule` serves is refused
        with prefect_server.settings():
            assert cli.main(["deploy"]) == 2
        refused = capsys.readouterr().err
        assert refused.count("\n") == 1, refused
        assert f"deployment {TRAINING}: a running `lensflow schedule` serves it" in refused
    finally:
        returncode, out = _stop(serving)
    assert returncode == 0, out
    assert "Traceback" not in out, out
    assert _deployment(prefect_server, TRAINING).paused  # Prefect pauses them as it stops


@pytest.fixture(scope="module")
def deployed(prefect_server, deploy_project):
    """`lensflow deploy`: the deployments on the `lensflow` process work pool."""
    result = _lensflow(["deploy"], prefect_server, deploy_project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"deployed {TRAINING}: on demand (no schedule) to work pool 'lensflow'" in result.stdout
    return result


def test_deploy_runs_the_training_deployment_on_a_worker(prefect_server, deploy_project, deployed):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    training = _deployment(prefect_server, TRAINING)
    assert training.work_pool_name == "lensflow" and not training.paused
    with prefect_server.settings(), get_client(sync_client=True) as client:
        assert client.read_work_pool("lensflow").type == "process"  # made by lensflow deploy
    log = deploy_project.parent / "worker.log"  # the flow run's output too: a file, not a pipe
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "lensflow"],
            cwd=deploy_project.parent,  # not the project: the deployment says where runs work
            env=_env(prefect_server, deploy_project),
            stdin=subprocess.DEVNULL,  # not pytest-xdist's channel, which this process would hold
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with prefect_server.settings():
            flow_run = run_deployment(
                TRAINING,
                parameters={"params_path": "params.yaml", "overrides": ["train.epochs=1"]},
                timeout=RUN_TIMEOUT_S,
            )
        assert flow_run.state.is_completed(), (flow_run.state, log.read_text()[-3000:])

        # never both: serving what a running worker runs is refused
        refused = _lensflow(["schedule"], prefect_server, deploy_project, timeout=60)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "a worker of work pool 'lensflow' runs it" in refused.stderr
    finally:
        # Prefect's worker sometimes takes minutes to end after SIGTERM when the suite runs
        # in two processes (seen in CI, never when this file runs alone); what it ran is checked
        # below, its own exit is not this test's subject.
        _stop(worker, timeout=30, kill=True)

    # the flow run logged to the MLflow store of the worker's environment
    client = mlflow.MlflowClient(f"sqlite:///{deploy_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lensflow")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}'"
    )
    assert runs and {r.info.status for r in runs} == {"FINISHED"}
    assert (deploy_project / "reports" / "registry.json").exists()  # worked in the project


def test_the_prefect_server_answers_only_clients_with_its_auth_string(prefect_server):
    """Every test here talks to it with the string (client_env, settings): the worker above
    completed its deployment run holding it."""
    import base64
    import urllib.error
    import urllib.request

    def post(headers: dict) -> int:
        request = urllib.request.Request(
            f"{prefect_server.api_url}/flows/filter", b"{}", headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    json_type = {"Content-Type": "application/json"}
    assert post(json_type) == 401
    wrong = base64.b64encode(b"not-the-string").decode()
    assert post({**json_type, "Authorization": f"Basic {wrong}"}) == 401
    right = base64.b64encode(prefect_server.auth_string.encode()).decode()
    assert post({**json_type, "Authorization": f"Basic {right}"}) == 200


@pytest.mark.parametrize(
    "job_variables",
    [{"command": "touch /tmp/lensflow-owned"}, {"env": {"PYTHONPATH": "/tmp"}},
     {"working_dir": "/tmp"}],
)  # fmt: skip
def test_the_pool_template_refuses_a_run_that_sets_the_command(
    prefect_server, deployed, job_variables
):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.deployments import POOL_TEMPLATE

    with prefect_server.settings():
        with get_client(sync_client=True) as client:
            assert client.read_work_pool("lensflow").base_job_template == POOL_TEMPLATE
        with pytest.raises(PrefectHTTPStatusError) as refused:
            run_deployment(TRAINING, job_variables=job_variables, timeout=0)
    assert refused.value.response.status_code == 422
    assert "Additional properties are not allowed" in refused.value.response.text


def test_retrain_trigger_creates_a_training_flow_run(prefect_server, deployed):
    """The monitoring flow's retrain policy: run_deployment(..., timeout=0) returns at once."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with prefect_server.settings():
        flow_run = run_deployment(TRAINING, timeout=0)
        with get_client(sync_client=True) as client:
            stored = client.read_flow_run(flow_run.id)
            client.delete_flow_run(flow_run.id)  # no worker runs it here
    assert stored.deployment_id == _deployment(prefect_server, TRAINING).id
    assert stored.state.is_scheduled()
    assert stored.parameters == {"params_path": "params.yaml", "overrides": []}
