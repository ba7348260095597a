"""The `lensflow` commands that operate on what training made: the registry (history, promote,
rollback, lineage), serving (serve, predict), the servers (stack) and the Prefect deployments
(schedule, deploy). flows/cli.py parses and dispatches; heavy imports stay inside commands."""

from __future__ import annotations

import json


def add_commands(sub, add_params, positive_int) -> None:
    history = sub.add_parser("history", help="the promotion log: decisions about @champion")
    add_params(history)
    history.add_argument("--limit", type=positive_int, default=20, help="default: %(default)s")
    history.set_defaults(command=cmd_history)

    promote = sub.add_parser("promote", help="move @champion to VERSION by hand (logged)")
    promote.add_argument("version", metavar="VERSION", help="a version of registry.model_name")
    promote.add_argument("--reason", required=True, help="why: it goes into the promotion log")
    add_params(promote)
    promote.set_defaults(command=cmd_promote)

    rollback = sub.add_parser("rollback", help="move @champion back to the previous champion")
    rollback.add_argument("--to", metavar="VERSION", help="default: the champion before this one")
    rollback.add_argument("--reason", required=True, help="why: it goes into the promotion log")
    add_params(rollback)
    rollback.set_defaults(command=cmd_rollback)

    lineage = sub.add_parser("lineage", help="where a registered version came from (JSON)")
    lineage.add_argument("ref", metavar="NAME@ALIAS|NAME/VERSION")
    add_params(lineage)
    lineage.set_defaults(command=cmd_lineage)

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
    stack.set_defaults(command=cmd_stack)

    model_help = "models:/NAME@ALIAS (followed), models:/NAME/VERSION or a .onnx file "
    model_help += "(default: models:/<registry.model_name>@champion)"
    serve = sub.add_parser("serve", help="HTTP service of the registry's @champion (hot swap)")
    add_params(serve)
    serve.add_argument("--model", help=model_help)
    serve.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    serve.add_argument("--port", type=positive_int, help="(serve.port)")
    serve.add_argument(
        "--poll-seconds", type=float, metavar="S", help="alias lookup interval (serve.poll_seconds)"
    )
    serve.add_argument(
        "--int8", action="store_true", help="serve the int8 variant where shipped (serve.int8)"
    )
    serve.set_defaults(command=cmd_serve)

    predict = sub.add_parser("predict", help="batch scoring: files and folders -> Parquet + CSV")
    add_params(predict)
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--model", help=model_help)
    predict.add_argument("--out", default="predictions", help="folder (default: %(default)s)")
    predict.add_argument("--int8", action="store_true", help="the int8 variant where shipped")
    predict.set_defaults(command=cmd_predict)
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


def cmd_history(args) -> int:
    from components import config, promotion_log

    cfg = config.load(args.params, args.overrides)
    entries = promotion_log.history(cfg, limit=args.limit)
    if not entries:
        print(f"no promotion decisions about {cfg.registry.model_name} yet")
    for e in entries:
        before, after = (f"v{v}" if v else "none" for v in (e["from_version"], e["to_version"]))
        moved = f"{before} -> {after}"
        why = f"{e['summary']}" + (f" -- reason: {e['reason']}" if e["reason"] else "")
        print(f"{e['time']}  {e['action']:<8}  @champion {moved:<12}  {e['actor']}  "
              f"[{e['record']}]  {why}")  # fmt: skip
    return 0


def cmd_promote(args) -> int:
    from components import config, promotion_log

    cfg = config.load(args.params, args.overrides)
    decision = promotion_log.override(cfg, args.version, args.reason)
    print(f"promote: {decision.summary} (logged, reason: {decision.reason})")
    return 0


def cmd_rollback(args) -> int:
    from components import config, promotion_log

    cfg = config.load(args.params, args.overrides)
    if args.to is not None and not args.to.isdigit():
        from components.config import UserError

        raise UserError(f"--to: expected a version number, got {args.to!r}")
    decision = promotion_log.rollback(cfg, args.to, args.reason)
    print(f"rollback: {decision.summary} (logged, reason: {decision.reason})")
    return 0


def cmd_lineage(args) -> int:
    from components import config, promotion_log

    cfg = config.load(args.params, args.overrides)
    print(json.dumps(promotion_log.lineage(cfg, args.ref), indent=2))
    return 0


def cmd_stack(args) -> int:
    from infra import stack

    if args.action == "up":
        servers, started = stack.up(args.mlflow_port, args.prefect_port, args.timeout)
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


def cmd_serve(args) -> int:
    from components import config

    overrides = list(args.overrides)
    for key in ("host", "port", "poll_seconds"):
        if getattr(args, key) is not None:
            overrides.append(f"serve.{key}={getattr(args, key)}")
    if args.int8:
        overrides.append("serve.int8=true")
    cfg = config.load(args.params, overrides)
    from serving import server

    return server.run(cfg, args.model)


def cmd_predict(args) -> int:
    from components import config

    overrides = [*args.overrides, *(["serve.int8=true"] if args.int8 else [])]
    cfg = config.load(args.params, overrides)
    from serving import batch

    print(batch.summary(batch.run(cfg, args.paths, args.model, args.out)))
    return 0


def cmd_schedule(args) -> int:
    from pathlib import Path

    from flows import deployments

    found = deployments.load(args.params, args.overrides, Path.cwd())
    server = deployments.api_url() or "a temporary Prefect server (no PREFECT_API_URL)"
    print(f"serving on {server}; Ctrl-C stops serving and pauses them:")
    for definition in found:
        print(f"  {definition.describe()}")
    deployments.serve(found, Path.cwd())
    return 0


def cmd_deploy(args) -> int:
    from pathlib import Path

    from components.config import UserError
    from flows import deployments

    if deployments.api_url() is None:
        raise UserError(
            "lensflow deploy needs the Prefect server its workers poll: set PREFECT_API_URL "
            "(lensflow stack up prints it)"
        )
    found = deployments.load(args.params, args.overrides, Path.cwd())
    deployments.deploy(found, Path.cwd(), args.pool)
    for definition in found:
        print(f"deployed {definition.describe()} to work pool '{args.pool}'")
    print(f"its flow runs run where a worker runs: prefect worker start --pool {args.pool}")
    return 0
