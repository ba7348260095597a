"""The `lensflow` command. Heavy libraries are imported inside commands so --help is instant.

Exit codes: 0 success, 1 a gate or check failed (a report says why), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from flows import cli_operations

STAGES = (
    "prepare", "validate", "tune", "train", "evaluate", "export", "quantize", "register", "promote",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for its temporary server; a busy 2-core machine can take longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from components.config import GateFailed, UserError
    from components.credentials import redact
    from flows import interrupt

    interrupt.install()  # SIGTERM, SIGHUP: a clean exit (see flows/interrupt.py)
    try:
        return args.command(args)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensflow", description="An orchestrated MLOps pipeline for image classification."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the training flow, end to end (Prefect)")
    _add_params(run)
    run.add_argument("--resume", action="store_true", help="continue training from models/last.pt")
    run.set_defaults(command=cmd_run)

    stage = sub.add_parser("stage", help="one component, as dvc.yaml calls it")
    stage.add_argument("name", choices=STAGES)
    _add_params(stage)
    stage.add_argument("--resume", action="store_true", help="train: continue from models/last.pt")
    stage.set_defaults(command=cmd_stage)

    data = sub.add_parser("data", help="write the built-in dataset of params.yaml and `dvc add` it")
    _add_params(data)
    data.set_defaults(command=cmd_data)

    doctor = sub.add_parser("doctor", help="sanity checks: initial loss ~ ln(C), overfit one batch")
    _add_params(doctor)
    doctor.set_defaults(command=cmd_doctor)

    evaluate = sub.add_parser("evaluate", help="score any lensflow model on any ImageFolder")
    evaluate.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/… or a .onnx file",
    )
    evaluate.add_argument("--data", help="an ImageFolder (default: this project's test split)")
    evaluate.add_argument("--report", default="model-evaluation.json", help="the JSON report")
    evaluate.set_defaults(command=cmd_evaluate)

    tune = sub.add_parser("tune", help="an Optuna study over tune.space (resumes the same study)")
    _add_params(tune)
    tune.add_argument("--trials", type=_positive_int, help="trials to run now (tune.trials)")
    tune.add_argument(
        "--workers", type=_positive_int, help="processes sharing the study (tune.workers)"
    )
    tune.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="start no trial after this many seconds (tune.timeout)",
    )
    tune.set_defaults(command=cmd_tune)

    validate = sub.add_parser("validate", help="validate any ImageFolder; exit 1 if the gate fails")
    validate.add_argument("path", help="an ImageFolder: PATH/<class>/<image>")
    validate.add_argument(
        "--report", default="validation.json", help="where to write the JSON report"
    )
    validate.set_defaults(command=cmd_validate)

    compare = sub.add_parser(
        "compare", help="scratch vs transfer learning: same data, same split, same evaluator"
    )
    _add_params(compare)
    compare.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        metavar="F",
        help="fractions of the training split, e.g. 1.0 0.1 (compare.fractions)",
    )
    compare.set_defaults(command=cmd_compare)

    monitor = sub.add_parser(
        "monitor", help="one continuous-validation pass on a batch; exit 1 on an alert"
    )
    _add_params(monitor)
    monitor.add_argument(
        "--data", help="the batch: <batch>/<class>/<image> or a flat folder (monitor.data)"
    )
    monitor.add_argument(
        "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a .onnx file "
        "(default: models:/<registry.model_name>@champion)",
    )  # fmt: skip
    monitor.set_defaults(command=cmd_monitor)

    cli_operations.add_commands(sub, _add_params, _positive_int)
    return parser


def _add_params(parser: argparse.ArgumentParser) -> None:
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


def cmd_run(args) -> int:
    from components import config, preflight

    # fail fast, before Prefect starts: a bad config, a missing folder, a model that cannot run
    preflight.check(config.load(args.params, args.overrides), resume=args.resume)
    from flows.training import training_flow

    _quiet_user_errors()
    summary = training_flow(params_path=args.params, overrides=args.overrides, resume=args.resume)
    print(_where_to_look(summary))
    return 0


def cmd_stage(args) -> int:
    import importlib

    from components import config, memory, preflight
    from components.config import UserError

    memory.use_returning_allocator()  # as the flow's stages do (see components/memory.py)
    cfg = config.load(args.params, args.overrides)
    if args.resume and args.name != "train":
        raise UserError("--resume applies to the train stage only")
    preflight.check(
        cfg, data=args.name == "prepare", model=args.name in ("tune", "train"), resume=args.resume
    )
    module = importlib.import_module(
        f"components.{'registry' if args.name == 'register' else args.name}"
    )  # promote: the version reports/registry.json names
    result = module.run(cfg, resume=True) if args.resume else module.run(cfg)
    print(module.summary(result) if hasattr(module, "summary") else f"{args.name}: {result}")
    if args.name == "validate" and not result.success:
        return 1
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def cmd_tune(args) -> int:
    from components import config, preflight

    overrides = [*args.overrides, "tune.enabled=true"]
    for key in ("trials", "workers", "timeout"):
        if getattr(args, key) is not None:
            overrides.append(f"tune.{key}={getattr(args, key)}")
    preflight.check(config.load(args.params, overrides))  # fail fast, before Prefect starts
    from components import tune
    from flows.tuning import tuning_flow

    _quiet_user_errors()
    result = tuning_flow(params_path=args.params, overrides=overrides)
    print(tune.summary(result))
    return 0


def cmd_data(args) -> int:
    from components import config, datasets

    root = datasets.run(config.load(args.params, args.overrides))
    print(f"data: {root}")
    return 0


def cmd_doctor(args) -> int:
    from components import config, preflight

    cfg = config.load(args.params, args.overrides)
    preflight.check(cfg, data=False)
    from components import doctor

    result = doctor.run(cfg)
    print(json.dumps(result, indent=2))
    print(doctor.summary(result))
    return 0 if result["passed"] else 1


def cmd_evaluate(args) -> int:
    from components import evaluate_model

    print(evaluate_model.summary(evaluate_model.run(args.model, args.data, args.report)))
    return 0


def cmd_validate(args) -> int:
    from components import validate, validate_folder

    result = validate_folder.run(args.path, args.report)
    print(validate.summary(result))
    return 0 if result.success else 1


def cmd_compare(args) -> int:
    from components import config, preflight

    overrides = list(args.overrides)
    if args.fractions:
        overrides.append(f"compare.fractions=[{', '.join(map(str, args.fractions))}]")
    cfg = config.load(args.params, overrides)
    preflight.check(cfg, model=False)
    from components import compare, tracking

    for arm, arm_cfg in compare.arm_configs(cfg).items():  # a bad override fails here
        preflight.check_model(arm_cfg.model, cfg.prepare.image_size, prefix=f"compare.{arm}: ")
    from flows.compare import compare_flow

    _quiet_user_errors()
    result = compare_flow(params_path=args.params, overrides=overrides)
    print(compare.summary(result))
    print(
        f"MLflow: parent run {result.mlflow_run_id}; mlflow ui --backend-store-uri "
        f"{tracking.shown_uri()} --host 127.0.0.1 --port 5000"
    )
    return 0


def cmd_monitor(args) -> int:
    from components import config
    from components.config import UserError

    cfg = config.load(args.params, args.overrides)  # fail fast, before Prefect starts
    data = args.data or cfg.monitor.data
    if not data:
        raise UserError("no batch to check: pass --data PATH or set monitor.data")
    if not os.path.isdir(data):
        raise UserError(f"{data}: batch folder not found (expected a folder of images)")
    from flows.monitoring import continuous_validation_flow

    _quiet_user_errors()
    report = continuous_validation_flow(
        params_path=args.params, data=args.data, model=args.model, overrides=args.overrides
    )
    retrain = report.get("retrain")
    if retrain and retrain["status"] == "no_deployment":
        print(f"lensflow: warning: {retrain['message']}", file=sys.stderr)
    return 1 if report["alert"] else 0


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task's and flow's exception with its traceback. A UserError or
    GateFailed is no bug: its message, which main() prints last, says what to change."""

    def filter(self, record: logging.LogRecord) -> bool:
        from components.config import GateFailed, UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError | GateFailed):
            record.exc_info = record.exc_text = None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForUserErrors())


def _where_to_look(summary: dict) -> str:
    from components import paths, registry, tracking

    champion = registry.champion_uri(summary["model_name"])
    promoted = (
        "promoted to @champion" if summary["promoted"] else f"not promoted: {summary['decision']}"
    )
    return "\n".join(
        [
            "",
            f"test accuracy {summary['test_accuracy']:.4f}, "
            f"macro-F1 {summary['test_macro_f1']:.4f}, "
            f"ONNX Runtime accuracy {summary['onnx_accuracy']:.4f}",
            f"model {summary['model_name']} version {summary['version']}: {promoted}",
            f"champion: {champion} (version {summary['champion_version']})",
            f"reports: {paths.VALIDATION_REPORT} {paths.EVALUATION_REPORT} {paths.EXPORT_REPORT} "
            f"{paths.REGISTRY_REPORT} {paths.PROMOTION_REPORT} (lensflow history: every decision)",
            tracking.ui_hint(summary["experiment_id"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
