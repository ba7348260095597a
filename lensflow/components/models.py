"""Model architectures, and the deployable classifier: preprocessing + network in one module.

A `Classifier` takes uint8 images [N, C, H, W]; training, evaluation and export all call the
same module, so the exported graph is exactly the model that was evaluated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lensflow.components.config import UserError
from lensflow.components.preprocess import Preprocess


class SimpleCNN(nn.Module):
    """Conv-BN-ReLU stages (each halving the resolution), global average pooling, dropout."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], dropout: float):
        super().__init__()
        stages, channels = [], in_channels
        for width in widths:
            stages += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))


class Classifier(nn.Module):
    """uint8 images -> logits, with resize and normalisation inside."""

    def __init__(self, preprocess: Preprocess, network: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(images))


def build(spec: dict) -> Classifier:
    """Build from a spec (stored in every checkpoint): arch, widths, dropout, classes, data."""
    if spec["arch"] != "simple_cnn":
        raise UserError(f"model.arch: unknown architecture {spec['arch']!r}")
    network = SimpleCNN(spec["channels"], len(spec["classes"]), spec["widths"], spec["dropout"])
    return Classifier(Preprocess(spec["image_size"], spec["mean"], spec["std"]), network)


def model_spec(model_cfg, meta: dict) -> dict:
    """Everything needed to rebuild the model, from params.model and the prepared data."""
    return {
        "arch": model_cfg.arch,
        "widths": list(model_cfg.widths),
        "dropout": model_cfg.dropout,
        "classes": meta["classes"],
        "channels": meta["channels"],
        "image_size": meta["image_size"],
        "mean": meta["mean"],
        "std": meta["std"],
    }


def save_checkpoint(model: Classifier, spec: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    if not Path(path).exists():
        raise UserError(f"{path}: checkpoint not found (run the train stage first)")
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    model = build(checkpoint["spec"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint["spec"]
