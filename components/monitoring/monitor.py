"""monitor: one continuous-validation pass of a model (default: the registry's @champion) on a
new batch of images.

The batch goes through the training data's gate (monitor_data), then each drift check
compares it with the model's reference profile (profile, drift); with labels, the model's
accuracy is compared with its recorded test accuracy and, when the registry has a
@challenger, the challenger with the model on the same images. The verdict goes to
reports/monitoring.json (and one row per image to reports/monitoring_images.csv,
`image_table`), to one MLflow run in `<tracking.experiment>-monitoring`, and, on an
alert, to the log and the webhook in LENSFLOW_ALERT_WEBHOOK.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from components.core import paths, tracking
from components.core.config import Config
from components.core.credentials import redact
from components.core.errors import UserError
from components.data import imagefacts
from components.drift import drift
from components.drift import profile as reference_profile
from components.monitoring import image_table, monitor_data
from components.release import registry
from components.release.promotion_log import CHALLENGER

WEBHOOK_ENV = "LENSFLOW_ALERT_WEBHOOK"
ISSUES_IN_REPORT = 100  # the whole list is in reports/monitoring_validation.json
log = logging.getLogger(__name__)


def run(cfg: Config, data: str | None = None, model: str | None = None) -> dict:
    """One pass; returns the report (reports/monitoring.json's content)."""
    import mlflow

    data = data or cfg.monitor.data
    if not data:
        raise UserError("no batch to check: pass --data PATH or set monitor.data")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    model_uri = model or registry.champion_uri(cfg.registry.model_name)
    session, meta = registry.load_onnx_session(model_uri)
    if "image_size" not in meta or "channels" not in meta:
        raise UserError(f"{model_uri}: no input spec in its metadata; export it again")
    profile = load_profile(model_uri)
    model_info = describe_model(model_uri)
    spec = (int(meta["channels"]), int(meta["image_size"]))
    batch = monitor_data.read(cfg, data, meta["classes"], *spec)

    checks = [data_check(batch), usable_check(batch)]
    tested, permutations = [], {"used": cfg.monitor.permutations, "note": ""}
    if len(batch.images):
        signals = reference_profile.signals(
            profile, session, batch.images, batch.widths, batch.heights
        )
        challenger = []
        if batch.labels is not None:
            accuracy, challenger = _labelled_checks(cfg, profile, signals, batch, data, meta)
            checks.append(accuracy)
        n_checks = drift.n_checks(profile.reference, signals) + len(challenger)
        permutations = _permutations(cfg, n_checks)
        tested = drift.checks(
            profile.reference, signals, len(meta["classes"]), permutations["used"], cfg.seed
        )
        tested += challenger
    checks += drift.bonferroni(tested, cfg.monitor.false_alarm_rate)
    table = []
    if len(batch.images):
        probabilities, _ = reference_profile.model_outputs(session, batch.images)
        table = image_table.rows(
            batch.files, batch.labels, meta["classes"], probabilities, signals,
            profile.reference, checks,
        )  # fmt: skip
    image_table.write(table)
    fired = [c["name"] for c in checks if not c["passed"]]
    report = {
        "alert": bool(fired),
        "fired": fired,
        "checks": checks,
        "false_alarm_rate": cfg.monitor.false_alarm_rate,
        "n_tests": len(tested),
        "permutations": permutations,
        "model": model_info,
        "batch": {
            "path": str(Path(data).expanduser().resolve()),
            "fingerprint": batch.fingerprint,
            "labelled": batch.labels is not None,
            "n_files": batch.validation["n_images"],
            "n_images": len(batch.images),
            "images": str(paths.MONITORING_IMAGES),
            "n_flagged": sum(row["flagged"] for row in table),
        },
        "validation": validation_summary(batch.validation),
        "reference": {k: profile.meta[k] for k in ("reference_split", "n_reference")},
    }
    report["webhook"] = alert_hook(report)
    paths.write_json(paths.MONITORING_VALIDATION, batch.validation)
    report["mlflow_run_id"] = log_run(cfg, report)
    paths.write_json(paths.MONITORING_REPORT, report)
    return report


def _permutations(cfg: Config, n_checks: int) -> dict:
    """The permutation count the MMD and class-prior tests need to be able to fire at this
    threshold, and the line that says so when it is more than monitor.permutations."""
    used, note = drift.permutations_for(
        n_checks, cfg.monitor.false_alarm_rate, cfg.monitor.permutations
    )
    if note:
        log.warning("lensflow monitor: %s", note)
    return {"used": used, "note": note}


def load_profile(model_uri: str) -> reference_profile.Profile:
    """The reference profile of a model: profile.npz next to an .onnx file, or the profile
    artifact of the run that registered a registry model."""
    if not model_uri.startswith(("models:/", "runs:/")):
        return reference_profile.load(Path(model_uri).with_name(paths.PROFILE.name))
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = tracking.model_run_id(model_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    with tempfile.TemporaryDirectory(prefix="lensflow-profile-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=tracking.PROFILE_ARTIFACT, dst_path=tmp
            )
        except (MlflowException, OSError):
            raise UserError(
                f"{model_uri}: its run {run_id} has no {tracking.PROFILE_ARTIFACT} (a model "
                "registered before reference profiles: run the pipeline again to register one)"
            ) from None
        return reference_profile.load(local)


def describe_model(model_uri: str) -> dict:
    """{uri, name, version} of a registry model; {uri, path} of a file."""
    if not model_uri.startswith("models:/"):
        return {"uri": model_uri}
    import mlflow

    name, at, alias = model_uri.removeprefix("models:/").partition("@")
    client = mlflow.MlflowClient()
    if at:
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    return {"uri": model_uri, "name": name, "version": str(version.version)}


def data_check(batch: monitor_data.Batch) -> dict:
    errors = sum(1 for issue in batch.validation["issues"] if issue["severity"] == "error")
    return {
        "name": "data_validation",
        "value": errors,
        "threshold": 0,
        "passed": bool(batch.validation["success"]),
    }


def usable_check(batch: monitor_data.Batch) -> dict:
    n = len(batch.images)
    return {"name": "usable_images", "value": n, "threshold": 1, "passed": n >= 1}


def _labelled_checks(cfg: Config, profile, signals: dict, batch, data, meta: dict) -> tuple:
    """The accuracy check, and the challenger's McNemar test when there is a challenger."""
    right = signals["predicted"] == batch.labels
    accuracy = float(right.mean())
    recorded = float(profile.meta["test_accuracy"])
    relative = accuracy / recorded if recorded > 0 else float("inf")
    check = {
        "name": "accuracy",
        "value": relative,
        "threshold": cfg.monitor.min_relative_accuracy,
        "passed": bool(relative >= cfg.monitor.min_relative_accuracy),
        "accuracy": accuracy,
        "test_accuracy": recorded,
    }
    challenger = _challenger_right(cfg, batch, data, meta)
    if challenger is None:
        return check, []
    only_challenger = int((challenger & ~right).sum())
    only_model = int((right & ~challenger).sum())
    from scipy.stats import binomtest

    n = only_challenger + only_model
    p_value = binomtest(only_challenger, n, 0.5, alternative="greater").pvalue if n else 1.0
    gain = float(challenger.mean()) - accuracy
    test = {"name": "challenger_vs_champion", "test": "mcnemar_one_sided", "statistic": gain}
    return check, [{**test, "p_value": float(p_value)}]


def _challenger_right(cfg: Config, batch, data, model_meta: dict) -> np.ndarray | None:
    """Which batch images the registry's @challenger gets right; None without a challenger
    (or with one that predicts other classes)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = cfg.registry.model_name
    try:
        mlflow.MlflowClient().get_model_version_by_alias(name, CHALLENGER)
    except MlflowException:
        return None
    session, meta = registry.load_onnx_session(f"models:/{name}@{CHALLENGER}")
    classes = model_meta["classes"]
    if sorted(meta["classes"]) != sorted(classes):
        log.warning("lensflow monitor: @%s predicts other classes: not compared", CHALLENGER)
        return None
    spec = (int(model_meta["channels"]), int(model_meta["image_size"]))
    own = (int(meta.get("channels", spec[0])), int(meta.get("image_size", spec[1])))
    images = batch.images
    if own != spec:  # decode the same files as the challenger takes them
        files = [str(Path(data).expanduser().resolve() / f) for f in batch.files]
        options = imagefacts.ReadOptions(*own, cfg.prepare.max_pixels)
        images = np.stack([pixels for _, pixels in imagefacts.read_many(files, options)])
    predicted = reference_profile.model_outputs(session, images)[0].argmax(axis=1)
    labels = np.array([meta["classes"].index(classes[i]) for i in batch.labels])
    return predicted == labels


def validation_summary(report: dict) -> dict:
    return {
        "success": report["success"],
        "n_images": report["n_images"],
        "n_used": report["n_used"],
        "counts": {code: n for code, n in report["counts"].items() if n},
        "issues": report["issues"][:ISSUES_IN_REPORT],
        "report": str(paths.MONITORING_VALIDATION),
    }


def alert_hook(report: dict) -> dict:
    """On an alert: a log line naming the checks that fired, and the report POSTed as JSON
    to LENSFLOW_ALERT_WEBHOOK when it is set. A webhook that fails is reported, not raised."""
    url = os.environ.get(WEBHOOK_ENV)
    if not report["alert"]:
        return {"status": "not_sent", "reason": "no alert"}
    model = report["model"]
    log.warning(
        "lensflow monitor ALERT: %s fired (model %s, batch %s)",
        ", ".join(report["fired"]),
        model.get("version", model["uri"]),
        report["batch"]["path"],
    )
    if not url:
        return {"status": "not_sent", "reason": f"{WEBHOOK_ENV} is not set"}
    import urllib.request

    body = json.dumps({k: v for k, v in report.items() if k != "validation"}).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return {"status": "sent", "url": redact(url), "http_status": response.status}
    except Exception as exc:  # an unreachable or failing hook must not lose the pass
        log.warning("lensflow monitor: the alert webhook %s failed: %s", redact(url), exc)
        return {"status": "failed", "url": redact(url), "error": redact(str(exc))}


def log_run(cfg: Config, report: dict) -> str:
    """One run in `<experiment>-monitoring`: a metric per check, so the UI shows trends."""
    import mlflow

    monitoring = cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"experiment": experiment(cfg)})}
    )
    experiment_id = tracking.setup(monitoring)
    model = report["model"]
    tags = {
        **tracking.process_tags(),
        "lensflow.step": "monitor",
        "model.uri": model["uri"],
        "model.version": model.get("version", ""),
        "batch.fingerprint": report["batch"]["fingerprint"],
        "alert": str(report["alert"]).lower(),
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name="monitor", tags=tags) as run:
        mlflow.log_params({"batch.path": report["batch"]["path"], "model.uri": model["uri"]})
        metrics = {"alert": float(report["alert"]), "n_images": report["batch"]["n_images"]}
        for check in report["checks"]:
            metrics[check["name"]] = float(check["value"])
            metrics[f"{check['name']}.passed"] = float(check["passed"])
        mlflow.log_metrics(metrics)
        mlflow.log_dict(report, "monitoring.json")
        mlflow.log_artifact(str(paths.MONITORING_VALIDATION))
        mlflow.log_artifact(str(paths.MONITORING_IMAGES))
        return run.info.run_id


def record(report: dict, **extra) -> dict:
    """The report with `extra` keys (the flow's retraining outcome), written again."""
    report = {**report, **extra}
    paths.write_json(paths.MONITORING_REPORT, report)
    return report


def experiment(cfg: Config) -> str:
    return f"{cfg.tracking.experiment}-monitoring"


def summary(report: dict) -> str:
    model, batch = report["model"], report["batch"]
    who = model["uri"]
    if "version" in model:
        who = f"{model['name']} version {model['version']}"
    head = (
        f"monitor: {who} on {batch['n_images']} of {batch['n_files']} files "
        f"({'labelled' if batch['labelled'] else 'no labels'}): "
        + (f"ALERT, fired: {', '.join(report['fired'])}" if report["alert"] else "no alert")
    )
    return f"{head}\nreport: {paths.MONITORING_REPORT}; MLflow run {report['mlflow_run_id']}"


def markdown(report: dict) -> str:
    """The pass as a markdown table (the Prefect artifact)."""
    lines = [
        f"# Continuous validation: {'ALERT' if report['alert'] else 'no alert'}",
        "",
        f"Model `{report['model']['uri']}` (version {report['model'].get('version', '-')}), "
        f"batch `{report['batch']['path']}`: {report['batch']['n_images']} images, "
        f"fingerprint `{report['batch']['fingerprint'][:16]}`.",
        "",
        "| check | value | threshold | passed |",
        "|---|---|---|---|",
    ]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {c['value']:.4g} | {c['threshold']:.4g} | {c['passed']} |")
    return "\n".join(lines) + "\n"
