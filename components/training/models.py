"""Model architectures, and the deployable classifier: preprocessing + network in one module.

A `Classifier` takes uint8 images [N, C, H, W]; training, evaluation and export all call the
same module, so the exported graph is exactly the model that was evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import torch
from torch import nn

from components.core import paths
from components.core.errors import UserError
from components.core.params_pipeline import Arch, TorchvisionArch
from components.data.preprocess import Preprocess
from components.training import archs
from components.training import pretrained as pretrained_weights


class SimpleCNN(nn.Module):
    """Conv-BN-ReLU stages (each halving the resolution), global average pooling, dropout."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], dropout: float):
        super().__init__()
        stages, channels = [], in_channels
        for width in widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
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
        self.frozen: list[nn.Module] = []  # backbone stages that do not learn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(images))

    def stages(self) -> list[nn.Module]:
        """The backbone, input to output, in units that transfer learning unfreezes."""
        return backbone_stages(self.network)

    def set_trainable_stages(self, count: int | None) -> None:
        """Train the head and the last `count` backbone stages (None: everything; 0: the head
        only, i.e. feature extraction). Frozen stages' batch-norm layers also stop updating
        their running statistics: `train()` keeps them in eval mode."""
        self.frozen = freeze_stages(self.stages(), count)  # the head is never frozen
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            hold_batch_norm(self.frozen)
        return self


def freeze_stages(stages: list[nn.Module], count: int | None) -> list[nn.Module]:
    """Let the last `count` of `stages` learn (None: all; 0: none) and freeze the others
    (requires_grad off); returns the frozen ones, for `hold_batch_norm`. Classification's
    `Classifier` and a detector's transferred stages (components/detection/train.py)."""
    frozen = [] if count is None else stages[: len(stages) - count]
    frozen_ids = {id(p) for stage in frozen for p in stage.parameters()}
    for stage in stages:
        for parameter in stage.parameters():
            parameter.requires_grad = id(parameter) not in frozen_ids
    return frozen


def hold_batch_norm(frozen: list[nn.Module]) -> None:
    """Frozen stages' batch-norm layers in eval mode (after each `train()`): their running
    statistics do not move."""
    for stage in frozen:
        for module in stage.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TORCHVISION_ARCHS = get_args(TorchvisionArch)
ARCHS = get_args(Arch)  # flattened: the nested Literal's names included


def build(spec: dict, pretrained: str | None = None) -> Classifier:
    """Build from a spec (stored in every checkpoint). `pretrained` loads initial weights:
    "efficientnet-lite0", "torchvision", a local state_dict file or an MLflow model URI."""
    network = _network(spec)
    if pretrained:
        pretrained_weights.load(network, head(network), spec, pretrained)
    return Classifier(Preprocess(input_size(spec), spec["mean"], spec["std"]), network)


def _network(spec: dict) -> nn.Module:
    arch, channels, num_classes = spec["arch"], spec["channels"], len(spec["classes"])
    if arch == "simple_cnn":
        return SimpleCNN(channels, num_classes, spec["widths"], spec["dropout"])
    if arch == "resnet_cnn":
        return ResidualCNN(channels, num_classes, spec["widths"], spec["dropout"], spec["se"])
    if arch == "mini_alexnet":
        return MiniAlexNet(channels, num_classes, spec["dropout"])
    if arch == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        network = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
        # The TensorFlow port's BN momentum (0.01) lets running statistics trail the weights
        # for hundreds of steps: fine-tuned, the model evaluates with stale ImageNet stats.
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
    elif arch in TORCHVISION_ARCHS:
        import torchvision

        network = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        raise UserError(f"model.arch: unknown architecture {arch!r}; choose one of {ARCHS}")
    return nn.Sequential(GrayToRGB(), network) if channels == 1 else network


def head(network: nn.Module) -> nn.Linear:
    """The classifier head: the last Linear layer, in every supported architecture."""
    return [m for m in network.modules() if isinstance(m, nn.Linear)][-1]


def backbone_stages(network: nn.Module) -> list[nn.Module]:
    """Every parameter outside the head, in input-to-output units: the network's children,
    containers (Sequential, ModuleList) opened one level, the child holding the head opened
    down to it. E.g. resnet18: conv1, bn1, its 8 basic blocks; efficientnet_b0: its 9
    feature stages; mobilenet_v3: its feature blocks and the classifier's hidden layer."""
    if isinstance(network, nn.Sequential) and isinstance(network[0], GrayToRGB):
        network = network[1]
    units = _units_around_head(network, head(network), open_containers=True)
    return [unit for unit in units if any(True for _ in unit.parameters())]


def _units_around_head(module: nn.Module, classifier_head: nn.Module, open_containers: bool):
    units = []
    for child in module.children():
        if child is classifier_head:
            continue
        if any(m is classifier_head for m in child.modules()):
            units += _units_around_head(child, classifier_head, open_containers=False)
        elif open_containers and isinstance(child, nn.Sequential | nn.ModuleList):
            units += list(child.children())
        else:
            units.append(child)
    return units


class GrayToRGB(nn.Module):
    """ImageNet architectures expect 3 channels: repeat a grayscale channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, max(8, channels // reduction), 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(max(8, channels // reduction), channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ResidualBlock(nn.Module):
    """Two 3x3 Conv-BN, an optional squeeze-and-excitation, and the identity shortcut
    (a strided 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, se: bool):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            SqueezeExcitation(out_channels) if se else nn.Identity(),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A stem, one residual block per width (each after the first halves the resolution),
    global average pooling, dropout and a linear head."""

    def __init__(self, in_channels, num_classes, widths, dropout, se=False):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks, channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(ResidualBlock(channels, width, 1 if i == 0 else 2, se))
            channels = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.head(self.dropout(x))


class MiniAlexNet(nn.Module):
    """AlexNet's shape at small scale: wide early convs, max-pooling, two dropout-regularised
    fully connected layers."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(128 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def model_spec(model_cfg, meta: dict) -> dict:
    """Everything needed to rebuild the model, from params.model and the prepared data.
    ImageNet weights bring ImageNet's normalisation and at least 64 px (archs); otherwise the
    training data's statistics and size. An input too small for the arch is a UserError."""
    problem = archs.input_size_problem(model_cfg, meta["image_size"])
    if problem:
        raise UserError(problem)
    mean, std = meta["mean"], meta["std"]
    if model_cfg.pretrained in archs.IMAGENET_WEIGHTS:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if meta["channels"] == 1:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
    return {
        "arch": model_cfg.arch,
        "widths": list(model_cfg.widths),
        "dropout": model_cfg.dropout,
        "se": model_cfg.se,
        "pretrained": model_cfg.pretrained,
        "classes": meta["classes"],
        "channels": meta["channels"],
        "image_size": meta["image_size"],  # what the data was prepared at: what to send
        "input_size": archs.network_input_size(model_cfg, meta["image_size"]),  # what it sees
        "mean": mean,
        "std": std,
    }


def input_size(spec: dict) -> int:
    """The size the network sees (checkpoints from before model.input_size: image_size)."""
    return spec.get("input_size", spec["image_size"])


def save_checkpoint(model: Classifier, spec: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic(path) as partial:
        torch.save({"spec": spec, "state_dict": model.state_dict()}, partial)


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    if not Path(path).exists():
        raise UserError(f"{path}: checkpoint not found (run the train stage first)")
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    model = build(checkpoint["spec"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint["spec"]
