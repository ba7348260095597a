"""The arms of `lensflow compare`: each arm's config, params.yaml plus `compare.<arm>`. Light
(no torch): the preflight checks every arm's model before any work starts."""

from __future__ import annotations

from components.core import config
from components.core.config import Config
from components.core.errors import UserError

ARMS = ("scratch", "transfer")
ARM_SECTIONS = ("augment", "model", "train")  # arms differ in these; the data stays the same


def arm_configs(cfg: Config) -> dict[str, Config]:
    """The validated config of each arm; a bad override is one UserError naming it."""
    return {arm: arm_config(cfg, arm) for arm in ARMS}


def arm_config(cfg: Config, arm: str) -> Config:
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


def _flatten(overrides: dict, prefix: str = "") -> dict:
    """{"model.arch": x} and {"model": {"arch": x}} (as --set writes it) both mean model.arch."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
