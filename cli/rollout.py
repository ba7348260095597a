"""`lensflow rollout start|status|stop|watch` (a live rollout of @challenger) and
`lensflow feedback FILE` (true labels for served requests)."""

from __future__ import annotations

import json
import sys

from cli.arguments import add_params

FEEDBACK_CHUNK = 1000  # labels per POST /feedback


def add_commands(sub) -> None:
    rollout = sub.add_parser("rollout", help="a live rollout of @challenger: shadow or canary")
    actions = rollout.add_subparsers(required=True, metavar="ACTION")
    start = actions.add_parser("start", help="make VERSION @challenger and open the rollout")
    start.add_argument("version", metavar="VERSION", help="a version of registry.model_name")
    start.add_argument("--reason", default="", help="why (kept with the rollout)")
    status = actions.add_parser("status", help="the running (or last) rollout and its evidence")
    stop = actions.add_parser("stop", help="end the running rollout, keeping the champion")
    stop.add_argument("--reason", required=True, help="why: it goes into the promotion log")
    watch = actions.add_parser("watch", help="the controller: test, ramp, promote or end")
    watch.add_argument("--once", action="store_true", help="one pass, then exit")
    for parser, command in ((start, cmd_start), (status, cmd_status), (stop, cmd_stop),
                            (watch, cmd_watch)):  # fmt: skip
        add_params(parser)
        parser.set_defaults(command=command)

    feedback = sub.add_parser("feedback", help="send true labels of served requests (a file)")
    feedback.add_argument(
        "file", metavar="FILE", help=".csv, .jsonl or .parquet: request_id, label[, image]"
    )
    feedback.add_argument("--url", help="the service (default: http://serve.host:serve.port)")
    add_params(feedback)
    feedback.set_defaults(command=cmd_feedback)


def cmd_start(args, cfg) -> int:
    from components.release import rollout

    print(json.dumps(rollout.start(cfg, args.version, args.reason), indent=2))
    return 0


def cmd_status(args, cfg) -> int:
    from components.release import rollout

    print(json.dumps(rollout.status(cfg), indent=2))
    return 0


def cmd_stop(args, cfg) -> int:
    from components.release import rollout

    print(json.dumps(rollout.stop(cfg, args.reason), indent=2))
    return 0


def cmd_watch(args, cfg) -> int:
    from components.release import rollout

    final = rollout.watch(cfg, once=args.once, report=lambda line: print(line, flush=True))
    print(json.dumps(final, indent=2))
    return 0


def cmd_feedback(args, cfg) -> int:
    """Exit 0 when every label was recorded or a duplicate, 1 when some id or label was not
    known (listed), 2 for an unreadable file or an unreachable service."""
    items = _read_labels(args.file)
    url = (args.url or f"http://{cfg.serve.host}:{cfg.serve.port}").rstrip("/") + "/feedback"
    totals = {"recorded": 0, "duplicates": 0, "unknown_ids": [], "bad_labels": []}
    for begin in range(0, len(items), FEEDBACK_CHUNK):
        answer = _post(url, items[begin : begin + FEEDBACK_CHUNK])
        for key in totals:
            totals[key] += answer[key]
    unknown, bad = len(totals["unknown_ids"]), len(totals["bad_labels"])
    print(
        f"feedback: {totals['recorded']} recorded, {totals['duplicates']} duplicates ignored, "
        f"{unknown} unknown ids, {bad} bad labels"
    )
    for request_id in totals["unknown_ids"][:20]:
        print(f"  unknown request_id {request_id}", file=sys.stderr)
    for bad in totals["bad_labels"][:20]:
        print(f"  {bad['request_id']}: label {bad['label']!r} is no class", file=sys.stderr)
    return 1 if totals["unknown_ids"] or totals["bad_labels"] else 0


def _read_labels(file: str) -> list[dict]:
    from pathlib import Path

    import pandas as pd

    from components.core.errors import UserError

    path = Path(file)
    readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True),
               ".parquet": pd.read_parquet}  # fmt: skip
    if path.suffix not in readers:
        raise UserError(f"{file}: expected a .csv, .jsonl or .parquet file")
    try:
        frame = readers[path.suffix](path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{file}: cannot be read ({exc})") from None
    missing = {"request_id", "label"} - set(frame.columns)
    if missing:
        raise UserError(f"{file}: no column {', '.join(sorted(missing))} (needs request_id, label)")
    frame = frame.astype({"request_id": str, "label": str})
    if "image" not in frame:
        frame["image"] = 0
    return [
        {"request_id": r.request_id, "label": r.label, "image": int(r.image)}
        for r in frame.itertuples()
    ]


def _post(url: str, items: list[dict]) -> dict:
    import urllib.error
    import urllib.request

    from components.core.errors import UserError

    request = urllib.request.Request(
        url, json.dumps(items).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise UserError(f"{url}: {exc.code} {exc.read().decode(errors='replace')[:300]}") from None
    except OSError as exc:
        raise UserError(f"{url}: cannot reach the service ({exc})") from None
