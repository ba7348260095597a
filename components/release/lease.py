"""The promotion lease: a mutex across every process that talks to one MLflow tracking server,
held as a lease that its holder renews while it works.

- The lock is the registered model `<name>.promotion-lock`: MLflow's unique names let one
  process create it; the others get RESOURCE_ALREADY_EXISTS and wait.
- The holder renews it every lease_s / 3 by rewriting its description, which stamps its
  `last_updated_timestamp` with the tracking server's clock. A waiter reads the server's clock
  the same way, from `<name>.promotion-clock`, so no local clock is ever set against the
  server's.
- A waiter breaks the lock only when its holder is provably gone (same host, process gone) or
  its lease ran out: no renewal for longer than the lease the holder wrote on it.
- Right before an alias moves, the holder calls `check()`: one more renewal, which raises
  LeaseLost when the lock is gone, another's, or renewed later than lease_s after the renewal
  before (a waiter may have broken it meanwhile).
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from contextlib import suppress

from components.core import tracking
from components.core.errors import GateFailed

LOCK_SUFFIX = ".promotion-lock"
CLOCK_SUFFIX = ".promotion-clock"
HOLDER_TAG = "lensflow.lock_holder"
LEASE_TAG = "lensflow.lease_s"
WAIT_POLL_S = 0.5


class LeaseLost(GateFailed):
    """The holder no longer holds the promotion lock: it must not move an alias (exit 1)."""


class Lease:
    """`<name>.promotion-lock`, held by this process from `acquire()` to `release()`."""

    def __init__(self, client, name: str, lease_s: float):
        self.client, self.name, self.lease_s = client, name, lease_s
        self.lock_name = f"{name}{LOCK_SUFFIX}"
        self.holder = uuid.uuid4().hex
        self.lost: str | None = None
        self.renewals = 0
        self._stamp = 0  # the server's time (ms) of the last renewal
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> Lease:
        from mlflow.exceptions import MlflowException

        tags = {HOLDER_TAG: self.holder, LEASE_TAG: f"{self.lease_s:g}", **tracking.process_tags()}
        while True:
            try:
                held = self.client.create_registered_model(
                    self.lock_name, tags=tags, description=self._description()
                )
                break
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            break_if_stale(self.client, self.name)
            time.sleep(WAIT_POLL_S)
        self._stamp = held.last_updated_timestamp
        self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True)
        self._renewer.start()
        return self

    def check(self) -> None:
        """Renew now; LeaseLost unless this process still holds the lock."""
        with self._mutex:
            if self.lost is None:
                self.lost = self._renew()
            if self.lost is not None:
                raise LeaseLost(f"lost the promotion lock {self.lock_name}: {self.lost}")

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with suppress(MlflowException):
            if self.client.get_registered_model(self.lock_name).tags.get(HOLDER_TAG) == self.holder:
                self.client.delete_registered_model(self.lock_name)

    def _renew_until_stopped(self) -> None:
        pause_s = self.lease_s / 3
        while not self._stop.wait(pause_s):
            with self._mutex:
                if self.lost is not None:
                    return
                try:
                    self.lost, pause_s = self._renew(), self.lease_s / 3
                except Exception:  # a failed request (a busy database): try again soon
                    pause_s = min(1.0, self.lease_s / 10)

    def _renew(self) -> str | None:
        """Why the lease is lost, or None after a renewal that kept it."""
        from mlflow.exceptions import MlflowException

        try:
            held = self.client.get_registered_model(self.lock_name)
            if held.tags.get(HOLDER_TAG) != self.holder:
                return f"it was broken; pid {held.tags.get('lensflow.pid')} holds it now"
            self.renewals += 1
            stamp = self.client.update_registered_model(
                self.lock_name, description=self._description()
            ).last_updated_timestamp
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return "it was broken (deleted)"
            raise
        gap_s, self._stamp = (stamp - self._stamp) / 1000, stamp
        if gap_s > self.lease_s:
            return f"no renewal for {gap_s:.1f} s, past its {self.lease_s:g} s lease"
        return None

    def _description(self) -> str:
        return (
            f"held while {self.name}'s @champion is decided; the holder renews it every "
            f"{self.lease_s / 3:g} s (renewal {self.renewals})"
        )


def server_now(client, name: str) -> int:
    """The tracking server's clock (ms): the time it stamps on `<name>.promotion-clock`."""
    from mlflow.exceptions import MlflowException

    clock = f"{name}{CLOCK_SUFFIX}"
    note = f"the tracking server's clock for {name}'s promotion lock (its update time)"
    try:
        return client.update_registered_model(clock, description=note).last_updated_timestamp
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    with suppress(MlflowException):  # another waiter may create it first
        return client.create_registered_model(clock, description=note).last_updated_timestamp
    return client.update_registered_model(clock, description=note).last_updated_timestamp


def break_if_stale(client, name: str) -> None:
    """Break `<name>.promotion-lock` when its holder is provably gone or its lease ran out."""
    from mlflow.exceptions import MlflowException

    lock_name = f"{name}{LOCK_SUFFIX}"
    try:
        held = client.get_registered_model(lock_name)
    except MlflowException:
        return  # released meanwhile
    alive = tracking.process_alive(held.tags)
    lease_s = float(held.tags.get(LEASE_TAG, "inf"))
    idle_s = (server_now(client, name) - held.last_updated_timestamp) / 1000
    if alive is not False and idle_s <= lease_s:
        return
    why = "its process is gone" if alive is False else f"its {lease_s:g} s lease ran out"
    warnings.warn(
        f"broke the promotion lock {lock_name} ({why}; held by pid {held.tags.get('lensflow.pid')}"
        f" on {held.tags.get('lensflow.host')}, last renewed {idle_s:.0f} s ago)",
        stacklevel=4,
    )
    with suppress(MlflowException):
        now = client.get_registered_model(lock_name)
        if now.tags == held.tags and now.last_updated_timestamp == held.last_updated_timestamp:
            client.delete_registered_model(lock_name)


def break_by_hand(client, name: str) -> dict | None:
    """`lensflow promote --break-lock`: delete the lock whoever holds it; who held it, or
    None when no lock was held."""
    from mlflow.exceptions import MlflowException

    lock_name = f"{name}{LOCK_SUFFIX}"
    try:
        held = client.get_registered_model(lock_name)
        client.delete_registered_model(lock_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    idle_s = (server_now(client, name) - held.last_updated_timestamp) / 1000
    return {
        "pid": held.tags.get("lensflow.pid"),
        "host": held.tags.get("lensflow.host"),
        "alive": tracking.process_alive(held.tags),
        "last_renewed_s_ago": round(idle_s, 1),
    }
