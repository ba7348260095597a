"""Telling a process apart from a later one that reuses its PID, from another process.

A PID alone is not an identity: the OS hands it out again. PID + start time is, but the start
time psutil reports is boot time + ticks since boot, and boot time is derived from the wall
clock: when the clock steps (NTP, a virtual machine resumed), every process's start time moves
by the same amount and a living server looks like a stranger. Seconds after boot do not move.
"""

from __future__ import annotations

import psutil

SAME_START_S = 0.05  # start times are clock ticks (10 ms on Linux)


def started_after_boot(process: psutil.Process) -> float:
    """When `process` started, in seconds after boot; unaffected by wall-clock steps."""
    return round(process.create_time() - psutil.boot_time(), 2)


def find(pid: int, started: float | None) -> psutil.Process | None:
    """The running (not zombie) process `pid` that started `started` seconds after boot, or None
    when it is gone or its PID now belongs to another process. `started` None: any process
    with that PID. AccessDenied (another user's process) propagates."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(started_after_boot(process) - started) > SAME_START_S:
            return None
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.NoSuchProcess:
        return None
