"""Arguments more than one command group takes."""

from __future__ import annotations

import argparse


def add_params(parser: argparse.ArgumentParser, flag_overrides=None) -> None:
    """--params and --set; `flag_overrides(args)` turns the command's own flags into more
    `section.key=value` overrides, applied after --set (main loads the config once with both)."""
    parser.add_argument(
        "--params", default="params.yaml", help="the params file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter; repeatable",
    )
    parser.set_defaults(flag_overrides=flag_overrides or (lambda args: []))


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


MODEL_HELP = (
    "models:/NAME@ALIAS (followed), models:/NAME/VERSION or a .onnx file "
    "(default: models:/<registry.model_name>@champion)"
)
