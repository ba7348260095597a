"""`lensflow` commands on the registry's decisions: history, promote, rollback, lineage."""

from __future__ import annotations

import json

from cli.arguments import add_params, positive_int


def add_commands(sub) -> None:
    history = sub.add_parser("history", help="the promotion log: decisions about @champion")
    add_params(history)
    history.add_argument("--limit", type=positive_int, default=20, help="default: %(default)s")
    history.set_defaults(command=cmd_history)

    promote = sub.add_parser("promote", help="move @champion to VERSION by hand (logged)")
    promote.add_argument(
        "version", metavar="VERSION", nargs="?", help="a version of registry.model_name"
    )
    promote.add_argument(
        "--break-lock", action="store_true", help="clear the promotion lock instead (logged)"
    )
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


def cmd_history(args, cfg) -> int:
    from components.release import promotion_log

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


def cmd_promote(args, cfg) -> int:
    from components.core.errors import UserError
    from components.release import promotion_log

    if args.break_lock:
        if args.version is not None:
            raise UserError("--break-lock: give no VERSION (it only clears the promotion lock)")
        broken = promotion_log.break_lock(cfg, args.reason)
        print(f"promote: {broken['summary']} (logged, reason: {args.reason})")
        return 0
    if args.version is None:
        raise UserError("VERSION: say which version becomes @champion (or --break-lock)")
    decision = promotion_log.override(cfg, args.version, args.reason)
    print(f"promote: {decision.summary} (logged, reason: {decision.reason})")
    return 0


def cmd_rollback(args, cfg) -> int:
    from components.core.errors import UserError
    from components.release import promotion_log

    if args.to is not None and not args.to.isdigit():
        raise UserError(f"--to: expected a version number, got {args.to!r}")
    decision = promotion_log.rollback(cfg, args.to, args.reason)
    print(f"rollback: {decision.summary} (logged, reason: {decision.reason})")
    return 0


def cmd_lineage(args, cfg) -> int:
    from components.release import promotion_log, rollout

    info = promotion_log.lineage(cfg, args.ref)
    info["rollouts"] = rollout.of_version(cfg, info["name"], info["version"])
    print(json.dumps(info, indent=2))
    return 0
