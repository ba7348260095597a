"""export, for `task: detection`: the detector as ONNX up to its heads, NMS after the graph, and
its parity with PyTorch by box matching.

The graph (`model.Heads`) takes uint8 images [N, 3, H, W] of any size, resizes them to
`detection.image_size` inside and returns `model.OUTPUTS` of its architecture (`cls_logits`
[N, A, C], `bbox_regression` [N, A, 4], and for FCOS `bbox_ctrness` [N, A, 1]; SSDlite's class
logits have a background column first), then `embeddings` (monitoring's; parity and the
decoder read only the box outputs); anchors, decoding, score threshold and
per-class NMS run after it in `model.Decoder`, the same code for PyTorch and ONNX Runtime. Why
not NMS in the graph: the TorchScript exporter traces torchvision's postprocessing, and its
Python branches (no box above the threshold: no NMS at all) are frozen by the example input, so
a graph traced on an image with no detection silently has no NonMaxSuppression; the dynamo
exporter does not export torchvision's detectors (see Object detection, Feasibility). The heads
have no data-dependent shapes, so the TorchScript exporter (`dynamo=False`) exports them
faithfully.

Parity: on every test image, ONNX Runtime and eager PyTorch give the same number of boxes and
each box has a partner of its class at IoU >= 0.99 (reports/export.json, with ONNX Runtime vs
eager PyTorch ms per image at batch 1). Also what dvc.yaml's export stage declares:
metrics/export.json, models/golden.npz (golden images and the graph's outputs on them) and
models/profile.npz (the test detections' box statistics).
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from components.core import paths
from components.core.config import Config
from components.detection import model, train

# the paths dvc.yaml's export stage declares, as classification's export writes them
ONNX = paths.ONNX
REPORT = paths.EXPORT_REPORT
PARITY_IOU = 0.99
GOLDEN_IMAGES = 4
GOLDEN_BOX_IOU = 0.5  # an int8 box matches a golden one from this IoU (COCO's mAP@0.5)
SCORE_MARGIN = 1e-3


@dataclass(frozen=True)
class ExportResult:
    path: str
    parity: bool
    n_images: int
    mismatched: int


def export(detector, size: int, opset: int) -> bytes:
    heads = model.Heads(detector, size)
    names = list(heads.outputs)
    example = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            heads, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=["images"], output_names=names,
            dynamic_axes={"images": {0: "n", 2: "height", 3: "width"},
                          **{name: {0: "n"} for name in names}},
        )  # fmt: skip
    return buffer.getvalue()


def same_boxes(a: dict, b: dict, iou: float = PARITY_IOU, cuts: tuple = ()) -> bool:
    """As many boxes, and each box of either side has a partner of its class at >= iou (or
    with corners within 0.01 px).

    `cuts` (score threshold, max detections): boxes scoring within `SCORE_MARGIN` of where
    either side was cut (the threshold, or its lowest score when it kept max detections) are
    left out on both sides: which of near-tied boxes make a cut depends on float rounding
    (outputs equal to 1e-6), not on the graph."""
    if cuts:
        threshold, most = cuts
        floor = max(
            [threshold, *(float(d["scores"].min()) for d in (a, b) if len(d["scores"]) >= most)]
        )
        a, b = ({k: v[d["scores"] >= floor + SCORE_MARGIN] for k, v in d.items()} for d in (a, b))
    if len(a["boxes"]) != len(b["boxes"]):
        return False
    if len(a["boxes"]) == 0:
        return True
    same_class = a["labels"][:, None] == b["labels"][None, :]
    # a box clipped to the image's edge may have no area (IoU 0/0): equal corners match it
    close = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1) <= 0.01
    partner = ((box_iou(a["boxes"], b["boxes"]).nan_to_num(0) >= iou) | close) & same_class
    return bool(partner.any(1).all() and partner.any(0).all())


def box_agreement(a: dict, b: dict, iou: float) -> tuple[int, int]:
    """(boxes of either side with a partner of their class at IoU >= `iou` on the other side,
    boxes of both sides): how far an int8 graph's detections agree with the fp32 ones (serving's
    golden check of an int8 variant)."""
    total = len(a["boxes"]) + len(b["boxes"])
    if not len(a["boxes"]) or not len(b["boxes"]):
        return 0, total
    same_class = a["labels"][:, None] == b["labels"][None, :]
    partner = (box_iou(a["boxes"], b["boxes"]).nan_to_num(0) >= iou) & same_class
    return int(partner.any(1).sum() + partner.any(0).sum()), total


def golden_box_agreement(session, golden: dict, decode: model.Decoder) -> dict:
    """An int8 graph's boxes on the golden images against the golden (fp32) outputs, both
    decoded by `decode`: the share of boxes, of both sides together, with a partner of their
    class at IoU >= GOLDEN_BOX_IOU on the other side (no box on either side: 1). quantize
    ships an int8 detector, and serving serves one, only at serve.int8_min_agreement or more."""
    images = golden["images"]
    sizes = [images.shape[-2:]] * len(images)
    actual = decode(*session.run(list(decode.outputs), {"images": images}), sizes)
    expected = decode(*(golden[name] for name in decode.outputs), sizes)
    pairs = [box_agreement(a, e, GOLDEN_BOX_IOU) for a, e in zip(actual, expected, strict=True)]
    matched, total = sum(m for m, _ in pairs), sum(t for _, t in pairs)
    return {
        "n_images": len(images),
        "box_agreement": matched / total if total else 1.0,
        "iou": GOLDEN_BOX_IOU,
        "boxes": {"golden": sum(len(e["boxes"]) for e in expected),
                  "int8": sum(len(a["boxes"]) for a in actual)},
    }  # fmt: skip


def run(cfg: Config) -> ExportResult:
    import onnxruntime as ort

    cfg = train.settings(cfg)  # train.use_tuned: the study's score threshold, NMS IoU
    train.use_threads(cfg)  # eager PyTorch's speed on the threads it trained with
    detector = train.load(cfg)
    data = export(detector, cfg.detection.image_size, cfg.export.opset)
    paths.MODELS.mkdir(parents=True, exist_ok=True)
    with paths.atomic(ONNX) as partial:
        partial.write_bytes(data)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    images, _, _ = train.split_data("test")
    size = cfg.detection.image_size
    heads, decode = model.Heads(detector, size), model.Decoder(detector, size)
    cuts = (cfg.detection.score_threshold, cfg.detection.max_detections)
    mismatched, seconds, found = 0, {"onnx": 0.0, "torch": 0.0}, []
    for i in range(len(images)):
        one = np.array(images[i : i + 1])
        start = time.perf_counter()
        by_onnx = decode(*session.run(list(decode.outputs), {"images": one}), [one.shape[-2:]])[0]
        seconds["onnx"] += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            by_torch = decode(*heads(torch.from_numpy(one)), [one.shape[-2:]])[0]
        seconds["torch"] += time.perf_counter() - start
        mismatched += not same_boxes(by_onnx, by_torch, cuts=cuts)
        found.append(by_onnx)
    n = max(1, len(images))
    report = {
        "onnx": str(ONNX),
        "exporter": "torchscript (dynamo=False), heads only; NMS after the graph",
        "parity": mismatched == 0,
        "parity_iou": PARITY_IOU,
        "n_images": len(images),
        "mismatched_images": mismatched,
        "onnx_ms_per_image": round(1000 * seconds["onnx"] / n, 3),
        "torch_ms_per_image": round(1000 * seconds["torch"] / n, 3),
    }
    paths.write_json(REPORT, report)
    paths.write_metrics(
        paths.EXPORT_METRICS,
        {"export_parity": report["parity"], "onnx_ms_per_image": report["onnx_ms_per_image"]},
    )
    _write_golden(session, np.array(images[:GOLDEN_IMAGES]), decode.outputs)
    _write_profile(found, size)
    return ExportResult(str(ONNX), mismatched == 0, len(images), mismatched)


def _write_golden(session, images: np.ndarray, names: tuple[str, ...]) -> None:
    """models/golden.npz: a few test images and the graph's outputs on them (what register
    logs with the version, and serving compares a download with)."""
    outputs = session.run(list(names), {"images": images})
    with paths.atomic(paths.GOLDEN) as partial, partial.open("wb") as file:
        np.savez(file, images=images, **dict(zip(names, outputs, strict=True)))


def _write_profile(found: list[dict], size: int) -> None:
    """models/profile.npz: the box statistics of the test split's detections (boxes per image,
    widths and heights as fractions of the image, scores), a reference for monitoring."""
    boxes = [d["boxes"].numpy().reshape(-1, 4) / size for d in found]
    sides = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    with paths.atomic(paths.PROFILE) as partial, partial.open("wb") as file:
        np.savez(
            file,
            task=np.array("detection"),
            boxes_per_image=np.array([len(b) for b in boxes]),
            widths=sides[:, 2] - sides[:, 0],
            heights=sides[:, 3] - sides[:, 1],
            scores=np.concatenate([d["scores"].numpy() for d in found] or [np.zeros(0)]),
        )


def summary(result: ExportResult) -> str:
    verdict = "parity" if result.parity else f"NO parity on {result.mismatched} images"
    return f"export: {result.path}, {verdict} (of {result.n_images} test images, by box matching)"
