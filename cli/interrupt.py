"""Stopping a lensflow command from outside: SIGTERM (a scheduler's timeout, `kill`, a cancelled
CI job) and SIGHUP (a closed terminal) end it the way Ctrl-C does, with an exception that
unwinds every `with` block and then runs the exit handlers, instead of killing the process
where it stands. So the MLflow runs end KILLED, Prefect's temporary server (a uvicorn child
process that Prefect stops at exit) stops with the command, and worker processes are stopped.

Prefect turns a SIGTERM inside a flow into its own TerminationSignal, then sends the signal
again to the handler that was there before the flow: this one, once `install` has run.
Only SIGKILL cannot be caught: its MLflow runs are ended by the next run (`tracking.setup`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGHUP)
CHILD_GRACE_SECONDS = 5.0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: a KeyboardInterrupt, so whatever handles Ctrl-C handles it too
    (Optuna fails the running trial; the training loop keeps its last epoch in last.pt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install() -> None:
    """From now on, in this process, SIGTERM and SIGHUP raise Terminated in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set signal handlers
    for signum in SIGNALS:
        signal.signal(signum, _raise_terminated)


def _raise_terminated(signum: int, frame) -> None:
    for each in SIGNALS:  # one signal is enough: a second must not cut the cleanup short
        signal.signal(each, signal.SIG_IGN)
    raise Terminated(signum)


def stop_children(interrupt: KeyboardInterrupt) -> None:
    """Stop the worker processes (tune workers, prepare's readers) before exiting: Ctrl-C has
    reached them already; a SIGTERM only this process, so they get a SIGINT of their own. Any
    still alive after CHILD_GRACE_SECONDS is terminated."""
    children = multiprocessing.active_children()
    if isinstance(interrupt, Terminated):
        for child in children:
            if child.pid is not None:
                os.kill(child.pid, signal.SIGINT)
    deadline = time.monotonic() + CHILD_GRACE_SECONDS
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.terminate()
            child.join(1.0)
