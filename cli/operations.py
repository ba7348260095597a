"""`lensflow` commands that keep a project running: monitor (continuous validation), the local
servers (stack), MLflow accounts (account) and the Prefect deployments (schedule, deploy)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from cli.arguments import add_params, positive_int
from cli.prefect_logs import quiet_user_errors


def add_commands(sub) -> None:
    monitor = sub.add_parser(
        "monitor", help="one continuous-validation pass on a batch; exit 1 on an alert"
    )
    add_params(monitor)
    monitor.add_argument(
        "--data", help="the batch: <batch>/<class>/<image> or a flat folder (monitor.data)"
    )
    monitor.add_argument(
        "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a .onnx file "
        "(default: models:/<registry.model_name>@champion)",
    )  # fmt: skip
    monitor.set_defaults(command=cmd_monitor)

    stack = sub.add_parser(
        "stack", help="a local MLflow and Prefect server for the UIs: up, down, status"
    )
    stack.add_argument("action", choices=("up", "down", "status"))
    stack.add_argument("--mlflow-port", type=positive_int, help="default: a free port")
    stack.add_argument("--prefect-port", type=positive_int, help="default: a free port")
    stack.add_argument(
        "--timeout", type=float, default=180.0, metavar="SECONDS",
        help="up: how long to wait for both servers to answer (default: %(default)s)",
    )  # fmt: skip
    stack.add_argument(
        "--auth", action="store_true", help="up: MLflow accounts and a Prefect auth string, "
        "their secrets in .lensflow/auth/ (docs/team.md)",
    )  # fmt: skip
    stack.set_defaults(command=cmd_stack)

    account = sub.add_parser(
        "account", help="MLflow accounts of a server with authentication (as its admin)"
    )
    account.add_argument("action", choices=("add", "password"), help="add one, or give it a "
                         "new password (the admin's too)")  # fmt: skip
    account.add_argument("name", metavar="NAME")
    account.add_argument("--role", choices=("pipeline", "serving"), help="add: its grants")
    add_params(account)  # serving: the experiment and registered model it may read
    account.set_defaults(command=cmd_account)

    schedule = sub.add_parser(
        "schedule", help="serve the Prefect deployments on their schedules (params: schedule)"
    )
    add_params(schedule)
    schedule.set_defaults(command=cmd_schedule)

    deploy = sub.add_parser(
        "deploy", help="deploy the Prefect deployments to a process work pool, for its workers"
    )
    add_params(deploy)
    deploy.add_argument(
        "--pool", default="lensflow", help="the work pool, made if missing (default: %(default)s)"
    )
    deploy.set_defaults(command=cmd_deploy)


def cmd_monitor(args, cfg) -> int:
    from components import preflight
    from components.core.errors import UserError

    preflight.check_task(cfg, "monitor")
    data = args.data or cfg.monitor.data
    if not data:
        raise UserError("no batch to check: pass --data PATH or set monitor.data")
    if not os.path.isdir(data):
        raise UserError(f"{data}: batch folder not found (expected a folder of images)")
    from flows.monitoring import continuous_validation_flow

    quiet_user_errors()
    report = continuous_validation_flow(
        params_path=args.params, data=args.data, model=args.model, overrides=args.overrides
    )
    retrain = report.get("retrain")
    if retrain and retrain["status"] == "no_deployment":
        print(f"lensflow: warning: {retrain['message']}", file=sys.stderr)
    return 1 if report["alert"] else 0


def cmd_stack(args, cfg) -> int:
    from infra import stack

    if args.action == "up":
        auth = None
        if args.auth:  # `serving` may read params.yaml's experiment and model
            from components.core import config

            cfg = config.load("params.yaml")
            auth = (cfg.tracking.experiment, cfg.registry.model_name)
        servers, started = stack.up(args.mlflow_port, args.prefect_port, args.timeout, auth)
        print(f"# {'started' if started else 'already running'}: MLflow UI "
              f"{servers['mlflow'].url}, Prefect UI {servers['prefect'].url}")  # fmt: skip
        print("\n".join(stack.exports(servers)))
        return 0
    if args.action == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0
    servers = stack.status()
    if not servers:
        print("not running (lensflow stack up starts it)")
        return 1
    for name, state in servers.items():
        health = "healthy" if state["healthy"] else "not answering"
        running = f"pid {state['pid']}" if state["running"] else f"pid {state['pid']} gone"
        print(f"{name}: {state['url']} {running}, {health} (log {state['log']})")
    return 0 if all(s["running"] and s["healthy"] for s in servers.values()) else 1


def cmd_account(args, cfg) -> int:
    """As the environment's MLflow account (the admin): a new account with a generated
    password and the grants of its role, or a new password; the password goes into
    .lensflow/auth/NAME (0600), never to the terminal."""
    from components.core import tracking
    from components.core.errors import UserError
    from infra import accounts

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]*", args.name):
        raise UserError(f"account name {args.name!r}: letters, digits and _ . @ - only")
    if args.action == "add" and args.role is None:
        raise UserError("account add: say which grants it gets: --role pipeline|serving")
    admin = accounts.Admin.login(tracking.tracking_uri())
    if args.action == "add" and admin.exists(args.name):
        raise UserError(f"account {args.name!r} exists: lensflow account password {args.name}")
    if args.action == "password" and not admin.exists(args.name):
        raise UserError(f"no account {args.name!r}: lensflow account add {args.name} --role …")
    password = accounts.generate()
    admin.set_password(args.name, password)
    if args.action == "add":
        admin.grant_role(args.name, args.role, cfg.tracking.experiment, cfg.registry.model_name)
    where = accounts.write_secret(accounts.AUTH_DIR / args.name, password)
    done = f"added with role {args.role}" if args.action == "add" else "has a new password"
    print(f"account {args.name} {done}; its password is in {where} (only you can read it)")
    return 0


def cmd_schedule(args, cfg) -> int:
    from flows import deployments

    found = deployments.load(cfg, args.params, args.overrides, Path.cwd())
    server = deployments.api_url() or "a temporary Prefect server (no PREFECT_API_URL)"
    print(f"serving on {server}; Ctrl-C stops serving and pauses them:")
    for definition in found:
        print(f"  {definition.describe()}")
    deployments.serve(found, Path.cwd())
    return 0


def cmd_deploy(args, cfg) -> int:
    from components.core.errors import UserError
    from flows import deployments

    if deployments.api_url() is None:
        raise UserError(
            "lensflow deploy needs the Prefect server its workers poll: set PREFECT_API_URL "
            "(lensflow stack up prints it)"
        )
    found = deployments.load(cfg, args.params, args.overrides, Path.cwd())
    deployments.deploy(found, Path.cwd(), args.pool)
    for definition in found:
        print(f"deployed {definition.describe()} to work pool '{args.pool}'")
    print(f"its flow runs run where a worker runs: prefect worker start --pool {args.pool}")
    return 0
