"""`lensflow`: parse, load the config once, run the command, turn its outcome into an exit code.

Exit codes: 0 success, 1 a gate or check failed (a report says why), 2 bad usage or bad input,
130 interrupted (Ctrl-C), 128 + N stopped by signal N (SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import os
import sys

from cli import dataloop, operations, pipeline, registry, rollout, serving


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for its temporary server; a busy 2-core machine can take longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from cli import interrupt
    from components.core.credentials import redact
    from components.core.errors import GateFailed, UserError

    interrupt.install()  # SIGTERM, SIGHUP: a clean exit (see cli/interrupt.py)
    try:
        return args.command(args, _config(args))
    except UserError as exc:
        print(f"lensflow: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"lensflow: gate failed: {redact(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:
        refused = _refused_by_mlflow(exc)
        if refused is None:
            raise
        print(f"lensflow: error: {redact(refused)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        interrupt.stop_children(stop)
        if isinstance(stop, interrupt.Terminated):
            print(f"lensflow: stopped by {stop}", file=sys.stderr)
            return 128 + stop.signum
        return 130


def _refused_by_mlflow(exc: BaseException | None) -> str | None:
    """An MLflow server's 401 or 403 (here or in the causes) as one line naming the account;
    None for any other error."""
    errors = sys.modules.get("mlflow.exceptions")
    while errors is not None and exc is not None:
        if isinstance(exc, errors.MlflowException) and exc.get_http_status_code() in (401, 403):
            account = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"account {account!r}" if account else "a client without an account"
            return (
                f"the MLflow server refused {who} (HTTP {exc.get_http_status_code()}): "
                f"{exc.message.splitlines()[0][:200]}; which command needs which account: "
                "docs/team.md, Accounts and permissions"
            )
        exc = exc.__cause__ or exc.__context__
    return None


def _config(args: argparse.Namespace):
    """The command's config: params file, then --set, then the command's own flags. None for a
    command that takes no params (validate, evaluate, stack). Flows get the same overrides."""
    if not hasattr(args, "params"):
        return None
    from components.core import config

    args.overrides = [*args.overrides, *args.flag_overrides(args)]
    return config.load(args.params, args.overrides)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensflow", description="An orchestrated MLOps pipeline for image classification."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in (pipeline, registry, serving, rollout, operations, dataloop):
        group.add_commands(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
