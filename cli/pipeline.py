"""`lensflow` commands that build a model: run, stage, data, doctor, tune, compare, evaluate,
validate."""

from __future__ import annotations

import json
from pathlib import Path

from cli.arguments import add_params, positive_int
from cli.prefect_logs import quiet_user_errors

# `lensflow stage NAME` runs STAGES[NAME].run(cfg), as dvc.yaml's stage NAME calls it
# (tests/test_layout.py derives each stage's code deps from this table).
STAGES = {
    "prepare": "components.data.prepare",
    "validate": "components.data.validate",
    "tune": "components.experiments.tune",
    "train": "components.training.train",
    "evaluate": "components.evaluation.evaluate",
    "export": "components.release.export",
    "quantize": "components.release.quantize",
    "register": "components.release.registry",
    "promote": "components.release.promote",  # the version reports/registry.json names
}
# `task: detection`: the modules of the same stages (each writes what its dvc.yaml stage declares).
DETECTION_STAGES = {
    "prepare": "components.detection.prepare",
    "validate": "components.detection.validate",
    "tune": "components.detection.tune",
    "train": "components.detection.train",
    "evaluate": "components.detection.evaluate",
    "export": "components.detection_release.export",
    "quantize": "components.detection_release.quantize",
    "register": "components.detection_release.registry",
    "promote": "components.detection_release.promote",  # the version reports/registry.json names
}


def add_commands(sub) -> None:
    run = sub.add_parser("run", help="the training flow, end to end (Prefect)")
    add_params(run)
    run.add_argument("--resume", action="store_true", help="continue training from models/last.pt")
    run.set_defaults(command=cmd_run)

    stage = sub.add_parser("stage", help="one component, as dvc.yaml calls it")
    stage.add_argument("name", choices=tuple(STAGES))
    add_params(stage)
    stage.add_argument("--resume", action="store_true", help="train: continue from models/last.pt")
    stage.set_defaults(command=cmd_stage)

    data = sub.add_parser("data", help="write the built-in dataset of params.yaml and `dvc add` it")
    add_params(data)
    data.set_defaults(command=cmd_data)

    doctor = sub.add_parser("doctor", help="sanity checks: initial loss ~ ln(C), overfit one batch")
    add_params(doctor)
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
    add_params(tune, _tune_overrides)
    tune.add_argument("--trials", type=positive_int, help="trials to run now (tune.trials)")
    tune.add_argument(
        "--workers", type=positive_int, help="processes sharing the study (tune.workers)"
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
    add_params(compare, _compare_overrides)
    compare.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        metavar="F",
        help="fractions of the training split, e.g. 1.0 0.1 (compare.fractions)",
    )
    compare.set_defaults(command=cmd_compare)


def cmd_run(args, cfg) -> int:
    from components import preflight

    # fail fast, before Prefect starts: a bad config, a missing folder, a model that cannot run
    preflight.check_task(cfg, "run")
    preflight.check(cfg, resume=args.resume)
    preflight.check_tune_storage(cfg)
    from flows.training import training_flow

    quiet_user_errors()
    summary = training_flow(params_path=args.params, overrides=args.overrides, resume=args.resume)
    print(_where_to_look(summary))
    return 0


def cmd_stage(args, cfg) -> int:
    import importlib

    from components import preflight
    from components.core import memory
    from components.core.errors import UserError

    memory.use_returning_allocator()  # as the flow's stages do (see components/core/memory.py)
    if args.resume and args.name != "train":
        raise UserError("--resume applies to the train stage only")
    preflight.check_task(cfg, "stage")  # every stage has its detection module
    preflight.check(
        cfg, data=args.name == "prepare", model=args.name in ("tune", "train"), resume=args.resume
    )
    if args.name == "tune":
        preflight.check_tune_storage(cfg)
    stages = DETECTION_STAGES if cfg.task == "detection" else STAGES
    module = importlib.import_module(stages[args.name])
    result = module.run(cfg, resume=True) if args.resume else module.run(cfg)
    print(module.summary(result) if hasattr(module, "summary") else f"{args.name}: {result}")
    if args.name == "validate" and not result.success:
        return 1
    return 0


def _tune_overrides(args) -> list[str]:
    overrides = ["tune.enabled=true"]
    for key in ("trials", "workers", "timeout"):
        if getattr(args, key) is not None:
            overrides.append(f"tune.{key}={getattr(args, key)}")
    return overrides


def cmd_tune(args, cfg) -> int:
    from components import preflight

    preflight.check_task(cfg, "tune")
    preflight.check(cfg)  # fail fast, before Prefect starts
    preflight.check_tune_storage(cfg)
    from components.experiments import tune
    from flows.tuning import tuning_flow

    quiet_user_errors()
    result = tuning_flow(params_path=args.params, overrides=args.overrides)
    print(tune.summary(result))
    return 0


def cmd_data(args, cfg) -> int:
    if cfg.task == "detection":
        from components.detection import synthetic

        print(f"data: {synthetic.run(cfg)}")
        return 0
    from components.data import datasets

    print(f"data: {datasets.run(cfg)}")
    return 0


def cmd_doctor(args, cfg) -> int:
    from components import preflight

    preflight.check_task(cfg, "doctor")
    preflight.check(cfg, data=False)
    from components.training import doctor

    result = doctor.run(cfg)
    print(json.dumps(result, indent=2))
    print(doctor.summary(result))
    return 0 if result["passed"] else 1


def cmd_evaluate(args, cfg) -> int:
    from components.evaluation import evaluate_model

    print(evaluate_model.summary(evaluate_model.run(args.model, args.data, args.report)))
    return 0


def cmd_validate(args, cfg) -> int:
    from components.core.errors import UserError
    from components.data import validate, validate_folder
    from components.detection import annotations

    if annotations.is_dataset(Path(args.path)):  # an ImageFolder of one class, "images"
        raise UserError(
            f"{args.path}: a detection dataset (images/ with annotations.json or labels/); "
            "`lensflow validate` checks an ImageFolder. Its gate: `lensflow stage prepare "
            f"--set task=detection --set data.source={args.path}`, then `lensflow stage "
            "validate` with the same --set (docs/detection.md)"
        )
    result = validate_folder.run(args.path, args.report)
    print(validate.summary(result))
    return 0 if result.success else 1


def _compare_overrides(args) -> list[str]:
    if not args.fractions:
        return []
    return [f"compare.fractions=[{', '.join(map(str, args.fractions))}]"]


def cmd_compare(args, cfg) -> int:
    from components import preflight

    preflight.check_task(cfg, "compare")
    preflight.check(cfg, model=False)
    preflight.check_compare_arms(cfg)
    from components.core import tracking
    from components.experiments import compare
    from flows.compare import compare_flow

    quiet_user_errors()
    result = compare_flow(params_path=args.params, overrides=args.overrides)
    print(compare.summary(result))
    print(
        f"MLflow: parent run {result.mlflow_run_id}; mlflow ui --backend-store-uri "
        f"{tracking.shown_uri()} --host 127.0.0.1 --port 5000"
    )
    return 0


def _where_to_look(summary: dict) -> str:
    from components.core import paths, tracking
    from components.release import registry

    champion = registry.champion_uri(summary["model_name"])
    promoted = (
        "promoted to @champion" if summary["promoted"] else f"not promoted: {summary['decision']}"
    )
    exported = paths.EXPORT_REPORT
    if summary.get("task") == "detection":
        scores = (
            f"test mAP@[.5:.95] {summary['test_map']:.4f}, mAP@0.5 {summary['test_map_50']:.4f}, "
            f"ONNX parity {'yes' if summary['export_parity'] else 'NO'}"
        )
    else:
        scores = (
            f"test accuracy {summary['test_accuracy']:.4f}, "
            f"macro-F1 {summary['test_macro_f1']:.4f}, "
            f"ONNX Runtime accuracy {summary['onnx_accuracy']:.4f}"
        )
    return "\n".join(
        [
            "",
            scores,
            f"model {summary['model_name']} version {summary['version']}: {promoted}",
            f"champion: {champion} (version {summary['champion_version']})",
            f"reports: {paths.VALIDATION_REPORT} {paths.EVALUATION_REPORT} {exported} "
            f"{paths.REGISTRY_REPORT} {paths.PROMOTION_REPORT} (lensflow history: every decision)",
            tracking.ui_hint(summary["experiment_id"]),
        ]
    )
