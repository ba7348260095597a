"""The arms of `lensflow compare`: each arm's config, params.yaml plus `compare.<arm>`. Light
(no torch): the preflight checks every arm's model before any work starts."""

from __future__ import annotations

from components.core import config
from components.core.config import Config
from components.core.errors import UserError

ARMS = ("scratch", "transfer")
ARM_SECTIONS = ("augment", "model", "train")  # arms differ in these; the data stays the same
# task: detection: the detector's keys of `detection` (not those that make or judge the data)
DETECTION_ARM_SECTIONS = ("augment", "detection", "train")
DETECTION_DATA_KEYS = (
    "annotations", "image_size", "synthetic_images", "synthetic_size", "duplicate_iou",
    "outside_tolerance", "policy",
)  # fmt: skip


EXAMPLE = 'compare.transfer={"detection.pretrained": "models:/lensflow-classifier@champion"}'


def arm_configs(cfg: Config) -> dict[str, Config]:
    """The validated config of each arm; a bad override is one UserError naming it."""
    return {arm: arm_config(cfg, arm) for arm in ARMS}


def arm_config(cfg: Config, arm: str) -> Config:
    if cfg.task == "detection":
        return _detection_arm_config(cfg, arm)
    values = {"model.pretrained": None} if arm == "scratch" else {}
    for key, value in _flatten(getattr(cfg.compare, arm)).items():
        section, _, leaf = key.partition(".")
        if section not in ARM_SECTIONS or not leaf or "." in leaf:
            raise UserError(
                f"compare.{arm}: {key!r} is not an augment, model or train key "
                "(every arm trains on the same prepared data)"
            )
        values[key] = value
    arm_cfg = config.with_values(cfg, values, source=f"compare.{arm}")
    if arm == "scratch" and arm_cfg.model.pretrained:
        raise UserError("compare.scratch: model.pretrained must stay null (random weights)")
    if arm == "transfer" and not arm_cfg.model.pretrained:
        raise UserError("compare.transfer: set model.pretrained (e.g. efficientnet-lite0)")
    return arm_cfg


def _detection_arm_config(cfg: Config, arm: str) -> Config:
    """Under task: detection an arm sets the detector's keys: `detection.*` (not its data
    keys), `train.*`, `augment.*`; the transfer arm names its classifier in
    `detection.pretrained`."""
    values = {"detection.pretrained": None} if arm == "scratch" else {}
    for key, value in _flatten(getattr(cfg.compare, arm)).items():
        section, _, leaf = key.partition(".")
        data_key = leaf.split(".")[0] in DETECTION_DATA_KEYS
        if section not in DETECTION_ARM_SECTIONS or not leaf or data_key:
            raise UserError(
                f"compare.{arm}: {key!r} is not a detector key under task: detection (an arm "
                "sets detection.*, train.* or augment.* keys; every arm trains on the same "
                f"prepared data), e.g. {EXAMPLE}"
            )
        values[key] = value
    arm_cfg = config.with_values(cfg, values, source=f"compare.{arm}")
    if arm == "scratch" and arm_cfg.detection.pretrained:
        raise UserError("compare.scratch: detection.pretrained must stay null (random weights)")
    if arm == "transfer" and not arm_cfg.detection.pretrained:
        raise UserError(
            f"compare.transfer: set detection.pretrained, a classifier lensflow trained (e.g. "
            f"{EXAMPLE})"
        )
    return arm_cfg


def _flatten(overrides: dict, prefix: str = "") -> dict:
    """{"model.arch": x} and {"model": {"arch": x}} (as --set writes it) both mean model.arch."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
