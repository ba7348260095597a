"""`lensflow` commands that deploy from the registry: serve (HTTP) and predict (batch)."""

from __future__ import annotations

import argparse

from cli.arguments import MODEL_HELP, add_params, positive_int


def add_commands(sub) -> None:
    serve = sub.add_parser("serve", help="HTTP service of the registry's @champion (hot swap)")
    add_params(serve, _serve_overrides)
    serve.add_argument("--model", help=MODEL_HELP)
    serve.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    serve.add_argument("--port", type=positive_int, help="(serve.port)")
    serve.add_argument(
        "--poll-seconds", type=float, metavar="S", help="alias lookup interval (serve.poll_seconds)"
    )
    serve.add_argument(
        "--int8", action="store_true", help="serve the int8 variant where shipped (serve.int8)"
    )
    serve.add_argument(
        "--workers", type=_workers, metavar="N", help="processes on the port; auto = the cores "
        "(serve.workers, default auto)",
    )  # fmt: skip
    serve.set_defaults(command=cmd_serve)

    predict = sub.add_parser("predict", help="batch scoring: files and folders -> Parquet + CSV")
    add_params(predict, _int8_override)
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--model", help=MODEL_HELP)
    predict.add_argument("--out", default="predictions", help="folder (default: %(default)s)")
    predict.add_argument("--int8", action="store_true", help="the int8 variant where shipped")
    predict.set_defaults(command=cmd_predict)


def _int8_override(args) -> list[str]:
    return ["serve.int8=true"] if args.int8 else []


def _serve_overrides(args) -> list[str]:
    overrides = [
        f"serve.{key}={getattr(args, key)}"
        for key in ("host", "port", "poll_seconds", "workers")
        if getattr(args, key) is not None
    ]
    return overrides + _int8_override(args)


def _workers(text: str) -> str:
    if text == "auto" or (text.isascii() and text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1 or auto")


def cmd_serve(args, cfg) -> int:
    from serving import server

    return server.run(cfg, args.model)


def cmd_predict(args, cfg) -> int:
    from serving import batch

    print(batch.summary(batch.run(cfg, args.paths, args.model, args.out)))
    return 0
