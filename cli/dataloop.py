"""`lensflow` commands that close the data loop: labels (find label errors), review export and
import (the Label Studio queue), ingest (reviewed labels as a new data version)."""

from __future__ import annotations

import sys

from cli.arguments import add_params, positive_int


def add_commands(sub) -> None:
    labels = sub.add_parser(
        "labels", help="find probable label errors (K-fold cross-fitting + cleanlab)"
    )
    add_params(labels, _labels_overrides)
    labels.add_argument("--folds", type=positive_int, help="K folds (labels.folds)")
    labels.add_argument(
        "--max-noise-rate", type=float, metavar="RATE",
        help="exit 1 when the estimated share of wrong labels is above it (labels.max_noise_rate)",
    )  # fmt: skip
    labels.set_defaults(command=cmd_labels)

    review = sub.add_parser("review", help="the Label Studio review queue: export, import")
    review.add_argument("action", choices=("export", "import"))
    add_params(review)
    review.add_argument(
        "--no-server", action="store_true",
        help="export: only write review/tasks.json (a Label Studio import file)",
    )  # fmt: skip
    review.add_argument(
        "--file", help="import: a Label Studio JSON export instead of the server's project"
    )
    review.set_defaults(command=cmd_review)

    ingest = sub.add_parser(
        "ingest", help="apply reviewed labels: relabels, new images, audit, dvc add"
    )
    add_params(ingest)
    ingest.add_argument(
        "--answers", default="review/answers.csv",
        help="the reviewed labels (lensflow review import writes them; default: %(default)s)",
    )  # fmt: skip
    ingest.set_defaults(command=cmd_ingest)


def _labels_overrides(args) -> list[str]:
    found = [f"labels.folds={args.folds}"] if args.folds else []
    if args.max_noise_rate is not None:
        found.append(f"labels.max_noise_rate={args.max_noise_rate}")
    return found


def cmd_labels(args, cfg) -> int:
    """data -> prepare -> validate (the data as it is now, relabels included), then labels."""
    from components import preflight

    preflight.check(cfg)
    from components.core import memory
    from components.core.errors import GateFailed
    from components.data import datasets, prepare, validate
    from components.labelling import labels

    memory.use_returning_allocator()
    datasets.run(cfg)
    prepare.run(cfg)
    validation = validate.run(cfg)
    print(validate.summary(validation))
    if not validation.success:
        raise GateFailed(f"the data failed validation; see {validation.report}")
    print(labels.summary(labels.run(cfg)))
    return 0


def cmd_review(args, cfg) -> int:
    from components.labelling import review

    if args.action == "export":
        result = review.export(cfg, server=not args.no_server)
        sources = ", ".join(f"{n} {name}" for name, n in result.per_source.items())
        where = (
            f"; project {result.project_id} (+{result.added} tasks)" if result.project_id else ""
        )
        print(f"review: {result.n_tasks} tasks ({sources}): {result.tasks_file}{where}")
        if result.note:
            print(f"lensflow: warning: {result.note}", file=sys.stderr)
        return 0
    found = review.import_answers(cfg, args.file)
    print(f"review: {len(found)} answers: {review.ANSWERS} (lensflow ingest applies them)")
    return 0


def cmd_ingest(args, cfg) -> int:
    from components.labelling import ingest

    print(ingest.summary(ingest.run(cfg, args.answers)))
    return 0
