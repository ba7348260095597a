"""The detection gate's checks, by file and by box, and what their policies decide.

By file: the image checks of the classification gate that apply to any image file (its
`validate.policy` for unreadable, empty, not an image, truncated, undecodable, too many
pixels, a link leading outside the folder), then `corrupt_annotations`, `missing_image`,
`size_mismatch` and `no_annotations`. By box: `unknown_class`, `degenerate_box`,
`box_outside_image` and `duplicate_box` (`detection.policy`). Every finding is an issue
{path, code, severity, message}; `error` and `quarantine` findings leave their image out of
the splits; the boxes kept are those of the images kept that are known, not degenerate and
not duplicates, clipped to their image. Nothing is modified on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.core.config import Config
from components.detection.annotations import Annotations

FILE_CODES = (
    "unreadable", "empty_file", "not_an_image", "truncated", "undecodable", "too_many_pixels",
    "symlink_outside_root",
)  # fmt: skip
ANNOTATION_CODES = ("corrupt_annotations", "missing_image", "size_mismatch", "no_annotations")
BOX_CODES = ("unknown_class", "degenerate_box", "box_outside_image", "duplicate_box")
CODES = (*FILE_CODES, *ANNOTATION_CODES, *BOX_CODES)
SEVERITIES = ("error", "quarantine", "warn")


@dataclass
class Findings:
    issues: list[dict]  # {path, code, severity, message}, errors first
    excluded_by: pd.Series  # per image (index of `images`): the codes that exclude it, or ""
    boxes: pd.DataFrame  # the annotation boxes, with `codes` and `kept` (clipped when kept)


def policies(cfg: Config) -> dict[str, str]:
    """code -> policy, for every check of the detection gate (off ones included)."""
    found = {code: getattr(cfg.validate_.policy, code) for code in FILE_CODES}
    return found | cfg.detection.policy.model_dump()


def find(images: pd.DataFrame, annotations: Annotations, cfg: Config) -> Findings:
    """`images`: one row per image file (path, decode, error, width, height), `annotations`
    with boxes in pixels."""
    policy = policies(cfg)
    sizes = images.loc[images["decode"] == "ok"].set_index("path")[["width", "height"]]
    boxes = _box_codes(annotations, sizes, cfg)
    found = [*_file_issues(images), *_annotation_issues(images, annotations, sizes, boxes)]
    for row in boxes[boxes["codes"] != ""].itertuples():
        box = f"[{row.x:g}, {row.y:g}, {row.w:g}, {row.h:g}]"
        for code in row.codes.split(","):
            found.append((row.image, code, _box_message(code, row, box, cfg)))
    issues = [
        {"path": path, "code": code, "severity": policy[code], "message": message}
        for path, code, message in found
        if policy[code] != "off"
    ]
    order = {code: i for i, code in enumerate(CODES)}
    issues.sort(key=lambda i: (SEVERITIES.index(i["severity"]), order[i["code"]], i["path"]))
    excluded_by = _excluded_by(images, issues)
    boxes["kept"] = _kept(boxes, excluded_by, images, policy)
    _clip(boxes, sizes)
    return Findings(issues, excluded_by, boxes)


def _file_issues(images: pd.DataFrame) -> list[tuple]:
    bad = images[images["decode"] != "ok"]
    return [(row.path, row.decode, row.error) for row in bad.itertuples()]


def _annotation_issues(images, annotations: Annotations, sizes, boxes) -> list[tuple]:
    found = []
    for problem in annotations.problems:
        path = problem.image if problem.code == "corrupt_annotations" and problem.image else None
        found.append((path or problem.path, problem.code, _where(problem)))
    listed = annotations.listed or {}
    for image, (width, height) in listed.items():
        if image in sizes.index and tuple(sizes.loc[image]) != (width, height):
            actual = "x".join(str(v) for v in sizes.loc[image])
            message = (
                f"{annotations.source} lists {width}x{height}, the file is {actual}: its boxes "
                "may be in other coordinates"
            )
            found.append((image, "size_mismatch", message))
    corrupt = {p.image for p in annotations.problems if p.code == "corrupt_annotations"}
    with_boxes = set(boxes["image"])
    for image in images.loc[images["decode"] == "ok", "path"]:
        if image not in with_boxes and image not in corrupt:
            found.append((image, "no_annotations", _why_no_box(image, annotations)))
    return found


def _where(problem) -> str:
    """The message, naming the annotation file first."""
    if problem.message.startswith(problem.path):
        return problem.message
    return f"{problem.path}: {problem.message}"


def _why_no_box(image: str, annotations: Annotations) -> str:
    if annotations.format == "coco":
        if image not in (annotations.listed or {}):
            return f"not listed in {annotations.source}: no boxes"
        return f"no box in {annotations.source}: used as a background image if kept"
    return "no label file, or an empty one: used as a background image if kept"


def _box_codes(annotations: Annotations, sizes: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The boxes with `codes`: the box checks each one breaks, comma-separated."""
    boxes = annotations.boxes.reset_index(drop=True).copy()
    size = sizes.reindex(boxes["image"]).to_numpy(dtype=float).reshape(-1, 2)
    tolerance = cfg.detection.outside_tolerance
    degenerate = (boxes["w"] <= 0) | (boxes["h"] <= 0)
    right, bottom = boxes["x"] + boxes["w"], boxes["y"] + boxes["h"]
    outside = (
        (boxes["x"] < -tolerance) | (boxes["y"] < -tolerance)
        | (right > size[:, 0] + tolerance) | (bottom > size[:, 1] + tolerance)
    ) & ~degenerate  # fmt: skip
    flags = {
        "unknown_class": ~boxes["category_id"].isin(list(annotations.categories)),
        "degenerate_box": degenerate,
        "box_outside_image": outside,
        "duplicate_box": _duplicates(boxes, ~degenerate, cfg.detection.duplicate_iou),
    }
    codes = pd.Series("", index=boxes.index, dtype=object)
    for code, bad in flags.items():
        codes[bad] = codes[bad].map(lambda old, code=code: f"{old},{code}".strip(","))
    boxes["codes"] = codes
    return boxes


def _duplicates(boxes: pd.DataFrame, valid: pd.Series, threshold: float) -> pd.Series:
    """True for each box with an earlier box of its image and class at IoU >= threshold."""
    duplicate = pd.Series(False, index=boxes.index)
    candidates = boxes[valid]
    for _, group in candidates.groupby(["image", "category_id"], sort=False):
        if len(group) < 2:
            continue
        xyxy = group[["x", "y", "w", "h"]].to_numpy(dtype=float, copy=True)
        xyxy[:, 2:] += xyxy[:, :2]
        iou = _iou_matrix(xyxy)
        earlier = np.tril(iou >= threshold, k=-1).any(axis=1)
        duplicate[group.index[earlier]] = True
    return duplicate


def _iou_matrix(xyxy: np.ndarray) -> np.ndarray:
    top_left = np.maximum(xyxy[:, None, :2], xyxy[None, :, :2])
    bottom_right = np.minimum(xyxy[:, None, 2:], xyxy[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = (xyxy[:, 2:] - xyxy[:, :2]).prod(axis=1)
    return inter / (area[:, None] + area[None, :] - inter)


def _box_message(code: str, row, box: str, cfg: Config) -> str:
    messages = {
        "unknown_class": f"class id {row.category_id} is not one of the categories",
        "degenerate_box": "zero or negative width or height",
        "box_outside_image": "reaches more than detection.outside_tolerance "
        f"({cfg.detection.outside_tolerance:g} px) outside the image",
        "duplicate_box": f"IoU ≥ detection.duplicate_iou ({cfg.detection.duplicate_iou:g}) "
        "with an earlier box of its class",
    }
    return f"{row.where}: box {box}: {messages[code]}"


def _excluded_by(images: pd.DataFrame, issues: list[dict]) -> pd.Series:
    """Per image: the codes whose error/quarantine findings leave it out; an image that does
    not decode is out in any case."""
    codes: dict[str, list[str]] = {}
    for issue in issues:
        if issue["severity"] in ("error", "quarantine"):
            found = codes.setdefault(issue["path"], [])
            if issue["code"] not in found:
                found.append(issue["code"])
    excluded = images["path"].map(lambda path: ",".join(codes.get(path, [])))
    undecoded = (images["decode"] != "ok") & (excluded == "")
    excluded[undecoded] = images.loc[undecoded, "decode"]
    return excluded


def _kept(boxes: pd.DataFrame, excluded_by: pd.Series, images, policy) -> pd.Series:
    kept_images = set(images.loc[excluded_by == "", "path"])
    # unknown classes and empty boxes cannot be learned whatever the policy; duplicates can
    unusable = ("unknown_class", "degenerate_box", *(
        ("duplicate_box",) if policy["duplicate_box"] != "off" else ()
    ))  # fmt: skip
    bad = boxes["codes"].map(lambda codes: any(code in codes.split(",") for code in unusable))
    return boxes["image"].isin(kept_images) & ~bad


def _clip(boxes: pd.DataFrame, sizes: pd.DataFrame) -> None:
    """Kept boxes clipped to their image (in place)."""
    kept = boxes["kept"]
    size = sizes.reindex(boxes.loc[kept, "image"]).to_numpy(dtype=float).reshape(-1, 2)
    x0 = boxes.loc[kept, "x"].clip(lower=0).to_numpy()
    y0 = boxes.loc[kept, "y"].clip(lower=0).to_numpy()
    x1 = np.minimum((boxes.loc[kept, "x"] + boxes.loc[kept, "w"]).to_numpy(), size[:, 0])
    y1 = np.minimum((boxes.loc[kept, "y"] + boxes.loc[kept, "h"]).to_numpy(), size[:, 1])
    boxes.loc[kept, ["x", "y", "w", "h"]] = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    boxes.loc[kept, "kept"] = (x1 > x0) & (y1 > y0)  # wholly outside: nothing left to learn
