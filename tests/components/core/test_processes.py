"""A process keeps its identity when the wall clock steps (NTP, a virtual machine resumed):
the stack still finds its servers and a run's process is not taken for dead."""

import subprocess
import sys

import psutil
import pytest

from components.core import tracking
from infra import stack
from infra.stack import Server

CLOCK_STEP_S = 7.0

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="steps the clock through psutil's Linux reader"
)


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def _step_the_clock(monkeypatch):
    """What psutil sees after the wall clock jumped forward: boot time is wall clock − uptime."""
    from psutil import _pslinux

    boot_time = _pslinux.boot_time()
    monkeypatch.setattr(_pslinux, "boot_time", lambda: boot_time + CLOCK_STEP_S)


def test_a_living_process_is_found_after_the_clock_steps(sleeper, monkeypatch):
    before = psutil.Process(sleeper.pid)
    epoch_start, started = before.create_time(), tracking.started_after_boot(before)
    tags = {**tracking.process_tags(), "lensflow.pid": str(sleeper.pid)}
    tags[tracking.PID_STARTED_TAG] = f"{started:.2f}"
    server = Server("mlflow", sleeper.pid, started, 5000, "mlflow.log")

    _step_the_clock(monkeypatch)

    assert psutil.Process(sleeper.pid).create_time() == pytest.approx(epoch_start + CLOCK_STEP_S)
    assert tracking.find_process(sleeper.pid, started).pid == sleeper.pid
    assert server.process() is not None
    assert tracking.process_alive(tags) is True


def test_a_reused_pid_is_not_the_process_that_had_it(sleeper):
    started = tracking.started_after_boot(psutil.Process(sleeper.pid))
    assert tracking.find_process(sleeper.pid, started - 1.0) is None  # same PID, earlier start
    sleeper.kill()
    sleeper.wait()
    assert tracking.find_process(sleeper.pid, started) is None


def test_a_stack_started_by_an_older_lensflow_is_still_found(sleeper, tmp_path, monkeypatch):
    # its state file recorded the start as a wall-clock time
    monkeypatch.chdir(tmp_path)
    epoch_start = psutil.Process(sleeper.pid).create_time()
    stack._write_state({"mlflow": Server("mlflow", sleeper.pid, epoch_start, 5000, "log")})
    assert stack.read_state()["mlflow"].process().pid == sleeper.pid
