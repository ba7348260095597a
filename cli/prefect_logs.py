"""Prefect logs a failed task's and flow's exception with its traceback. A UserError or
GateFailed is no bug: its message, which main() prints last, says what to change."""

from __future__ import annotations

import logging


class _NoTracebackForUserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from components.core.errors import GateFailed, UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError | GateFailed):
            record.exc_info = record.exc_text = None
        return True


def quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForUserErrors())
