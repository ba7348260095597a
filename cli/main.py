"""`lensflow`: parse, load the config once, run the command, turn its outcome into an exit code.

Exit codes: 0 success, 1 a gate or check failed (a report says why), 2 bad usage or bad input,
130 interrupted (Ctrl-C), 128 + N stopped by signal N (SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import os
import sys

from cli import dataloop, operations, pipeline, registry, serving


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
    except KeyboardInterrupt as stop:
        interrupt.stop_children(stop)
        if isinstance(stop, interrupt.Terminated):
            print(f"lensflow: stopped by {stop}", file=sys.stderr)
            return 128 + stop.signum
        return 130


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
    for group in (pipeline, registry, serving, operations, dataloop):
        group.add_commands(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
