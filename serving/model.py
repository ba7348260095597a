"""The model the service answers with: an ONNX Runtime session of one registry version, checked
on the golden inputs registered with it (export writes them, register logs them) before it may
serve. A failure that may pass (the network, an HTTP 5xx, I/O) raises Transient: try again
later. One that will not (golden mismatch, a file ONNX Runtime rejects, no class list, a
version the registry does not have) raises Refused."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.core import paths
from components.core.errors import UserError
from components.core.params_operations import Serve

LINEAGE_TAGS = ("git.commit", "git.dirty", "data.md5", "params.hash", "prefect.flow_run_id")


class Refused(Exception):
    """A version that cannot be served; the message says why."""


class Transient(Exception):
    """A version that could not be loaded this time (network, 5xx, I/O): retry it later."""


def is_transient(exc: BaseException) -> bool:
    """An OSError (requests' errors among them) or an MLflow error of HTTP status 5xx (MLflow
    wraps a refused connection or a timeout as INTERNAL_ERROR), here or in its causes."""
    from mlflow.exceptions import MlflowException

    while exc is not None:
        if isinstance(exc, OSError):
            return True
        if isinstance(exc, MlflowException) and exc.get_http_status_code() >= 500:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class Source:
    """What `--model` points to: a registry alias to follow, one version, or an .onnx file."""

    uri: str
    name: str = ""
    alias: str | None = None
    version: str | None = None
    file: str | None = None


@dataclass
class ServedModel:
    version: str
    session: object  # onnxruntime.InferenceSession
    classes: list[str]
    channels: int
    info: dict = field(default_factory=dict)  # what /model shows
    decoder: object = None  # a detector's components.detection.model.Decoder; None: a classifier
    onnx: bytes | None = None  # kept for a rollout's off-path process (serving/offpath.py)

    @property
    def task(self) -> str:
        return "classification" if self.decoder is None else "detection"

    def predict(self, images: np.ndarray):
        """Per image: a classifier's probabilities, or a detector's boxes (x1, y1, x2, y2 in
        the image's pixels), scores and labels after the same decoder as its evaluation."""
        if self.decoder is not None:
            from components.detection_release import registry

            return registry.detect(self.session, self.decoder, images)
        return self.session.run(["probabilities"], {"images": images})[0]


def boxes(found: dict, classes: list[str]) -> list[dict]:
    """A detector's answer for one image: its boxes, best first, each x1, y1, x2, y2 in the
    image's pixels, with its class name and score."""
    return [
        {"box": [round(v, 2) for v in box], "class": classes[label], "score": round(score, 6)}
        for box, label, score in zip(
            found["boxes"].tolist(),
            found["labels"].tolist(),
            found["scores"].tolist(),
            strict=True,
        )
    ]


def parse(uri: str) -> Source:
    if uri.startswith("models:/"):
        rest = uri.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return Source(uri, name=name, alias=alias)
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return Source(uri, name=name, version=version)
    elif uri.endswith(".onnx"):
        if not Path(uri).is_file():
            raise UserError(f"{uri}: ONNX file not found")
        return Source(uri, file=uri)
    raise UserError(f"--model {uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or a .onnx")


def alias_version(source: Source) -> str | None:
    """The version the alias points to now (None: no such alias yet). A registry that does
    not answer raises."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.MlflowClient().get_model_version_by_alias(source.name, source.alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return str(found.version)


def session(model: bytes | str, threads: int):
    """One intra-op thread by default: on a small CNN the request path then never waits for
    (or spins up) a thread pool, and the event loop's thread is the only busy one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def load(source: Source, version: str | None, settings: Serve) -> ServedModel:
    """Load one version (or the .onnx file), check it on its golden inputs, or raise Refused
    (it will not serve) or Transient (try again later)."""
    try:
        if source.file:
            model, golden, info = Path(source.file).read_bytes(), None, {"model": source.file}
            label = "file"
        else:
            model, golden, info = _download(source.name, version, settings.int8)
            label = version
        ort_session = session(model, settings.threads)
        meta = ort_session.get_modelmeta().custom_metadata_map
        classes = json.loads(meta.get("classes", "[]"))
        channels = int(meta.get("channels", ort_session.get_inputs()[0].shape[1]))
        decoder = _decoder(meta)
    except Refused:
        raise
    except Exception as exc:  # an unreachable store, a missing artifact, a bad file, ...
        reason = f"version {version} cannot be loaded: {type(exc).__name__}: {exc}"
        raise (Transient if is_transient(exc) else Refused)(reason) from None
    if not classes:
        raise Refused(f"version {version}: its ONNX metadata names no classes")
    if decoder is None:
        info["golden"] = check_golden(ort_session, golden, info.get("variant", "fp32"), settings)
    else:
        info["task"] = "detection"
        if info.get("variant") == "int8":
            info["golden"] = check_golden_boxes(ort_session, golden, decoder, settings)
        else:
            info["golden"] = check_golden_outputs(ort_session, golden, settings)
    info["loaded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kept = model if settings.rollout != "off" else None
    return ServedModel(str(label), ort_session, classes, channels, info, decoder, kept)


def _decoder(meta: dict):
    """A detector's decoder, rebuilt from its ONNX metadata
    (components/detection_release/registry.py); None for a classifier. torch is imported only
    here, for a detector."""
    if meta.get("task") != "detection":
        return None
    from components.detection_release import registry

    return registry.decoder(meta)


def check_golden_outputs(ort_session, golden: dict | None, settings: Serve) -> dict:
    """A detector: its raw outputs (class logits, box regression) on the golden images within
    serve.golden_atol of those registered with it."""
    if golden is None:
        return {"status": "missing", "note": "no golden inputs registered with this version"}
    names = [name for name in golden if name != "images"]  # the graph's outputs, by name
    try:
        actual = ort_session.run(names, {"images": golden["images"]})
    except Exception as exc:
        raise Refused(f"golden check: the model cannot run its golden inputs ({exc})") from None
    diffs = [
        float(np.abs(a - golden[n]).max()) if a.shape == golden[n].shape else float("inf")
        for n, a in zip(names, actual, strict=True)
    ]
    if max(diffs) > settings.golden_atol:
        raise Refused(f"golden check failed: max |output - golden| {max(diffs):.2e} "
                      f"(serve.golden_atol {settings.golden_atol:g})")  # fmt: skip
    return {"status": "passed", "n_images": len(golden["images"]), "max_abs_diff": max(diffs)}


def check_golden_boxes(ort_session, golden: dict | None, decoder, settings: Serve) -> dict:
    """A detector's int8 variant, whose raw outputs cannot meet serve.golden_atol: its boxes
    agree with the registered (fp32) golden outputs' at least serve.int8_min_agreement of the
    time (`export.golden_box_agreement`, the check quantize shipped it under)."""
    from components.detection_release import export

    if golden is None:
        return {"status": "missing", "note": "no golden inputs registered with this version"}
    try:
        result = export.golden_box_agreement(ort_session, golden, decoder)
    except Exception as exc:
        raise Refused(f"golden check: the model cannot run its golden inputs ({exc})") from None
    if result["box_agreement"] < settings.int8_min_agreement:
        raise Refused(
            f"golden check failed: {result['box_agreement']:.3f} of the int8 boxes and the golden "
            f"ones agree (same class, IoU >= {export.GOLDEN_BOX_IOU}) < serve.int8_min_agreement "
            f"{settings.int8_min_agreement:g}"
        )
    return {"status": "passed", **result}


def check_golden(ort_session, golden: dict | None, variant: str, settings: Serve) -> dict:
    """fp32: the golden probabilities within serve.golden_atol and every top-1 class the same;
    int8: the top-1 classes agree at least serve.int8_min_agreement of the time."""
    if golden is None:
        return {"status": "missing", "note": "no golden inputs registered with this version"}
    images, expected = golden["images"], golden["probabilities"]
    try:
        actual = ort_session.run(["probabilities"], {"images": images})[0]
    except Exception as exc:
        raise Refused(f"golden check: the model cannot run its golden inputs ({exc})") from None
    if actual.shape != expected.shape:
        raise Refused(f"golden check: probabilities {actual.shape}, expected {expected.shape}")
    max_abs_diff = float(np.abs(actual - expected).max())
    agreement = float((actual.argmax(1) == expected.argmax(1)).mean())
    result = {"n_images": len(images), "max_abs_diff": max_abs_diff, "top1_agreement": agreement}
    if variant == "int8":
        passed = agreement >= settings.int8_min_agreement
        limit = f"top-1 agreement {agreement:.3f} < serve.int8_min_agreement"
    else:
        passed = max_abs_diff <= settings.golden_atol and agreement == 1.0
        limit = f"max |p - golden p| {max_abs_diff:.2e} (serve.golden_atol {settings.golden_atol:g}), top-1 agreement {agreement:.3f}"  # noqa: E501
    if not passed:
        raise Refused(f"golden check failed: {limit}")
    return {"status": "passed", **result}


def _download(name: str, version: str, want_int8: bool) -> tuple[bytes, dict | None, dict]:
    import mlflow

    client = mlflow.MlflowClient()
    found = client.get_model_version(name, version)
    tags = found.tags
    info = {
        "model": f"models:/{name}/{version}",
        "name": name,
        "version": str(version),
        "run_id": found.run_id,
        "lineage": {key: tags[key] for key in LINEAGE_TAGS if key in tags},
        "metrics": _metrics(client, found),
        "variant": "fp32",
        "int8": "not asked (serve.int8 / --int8)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        location = _concrete(client, client.get_model_version_download_uri(name, version))
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp))
        model = _onnx_bytes(next(folder.rglob("*.onnx")))
        if want_int8:
            if tags.get("lensflow.int8") == "shipped":
                int8 = _concrete(client, f"runs:/{found.run_id}/int8/{paths.ONNX_INT8.name}")
                model = _onnx_bytes(
                    mlflow.artifacts.download_artifacts(artifact_uri=int8, dst_path=tmp)
                )
                info.update(variant="int8", int8="served")
            else:
                info["int8"] = f"not shipped with version {version}: serving fp32"
        golden = _golden(client, found.run_id, tmp)
    return model, golden, info


def _golden(client, run_id: str, tmp: str) -> dict | None:
    """The golden inputs logged with the version's run; None only when none were logged (a
    version registered before they existed). A listing or download that fails raises: the
    check is retried, never skipped."""
    import mlflow

    folder = str(Path(paths.GOLDEN_ARTIFACT).parent)
    if paths.GOLDEN_ARTIFACT not in {f.path for f in client.list_artifacts(run_id, folder)}:
        return None
    golden_uri = _concrete(client, f"runs:/{run_id}/{paths.GOLDEN_ARTIFACT}")
    golden_file = mlflow.artifacts.download_artifacts(artifact_uri=golden_uri, dst_path=tmp)
    with np.load(golden_file) as npz:  # a detector's: images and the graph's outputs
        return {key: npz[key] for key in npz.files}


def _concrete(client, uri: str) -> str:
    """The storage location behind a runs:/ or models:/ URI. MLflow's runs:/ repository turns
    any failed download (a 503, a refused connection) into "does not exist", which would make
    a passing outage look like a missing artifact; the store's own repository says what
    happened."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    if uri.startswith("models:/"):
        model_id, _, path = uri.removeprefix("models:/").partition("/")
        location = client.get_logged_model(model_id).artifact_location.rstrip("/")
        return f"{location}/{path}" if path else location
    return uri


def _onnx_bytes(path) -> bytes:
    """The model as one buffer: MLflow stores the weights as external data beside it."""
    import onnx

    return onnx.load(str(path)).SerializeToString()


def _metrics(client, found) -> dict:
    """The registering run's metrics and the gates it recorded (accuracy among them)."""
    metrics = {}
    try:
        metrics.update(client.get_run(found.run_id).data.metrics)
    except Exception:  # a deleted run: the version still serves
        pass
    if "lensflow.gates" in found.tags:
        metrics["gates"] = json.loads(found.tags["lensflow.gates"])
    return metrics
