"""A small convolutional autoencoder of the training images: images unlike them (noise, blur,
another domain) reconstruct worse, so its per-image reconstruction error is one more drift
signal, independent of the classifier."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.data import prepared

BATCH_SIZE = 64


class AutoEncoder(nn.Module):
    """uint8 images [N, C, H, W] -> reconstructions in [0, 1], through a bottleneck of 4
    channels at a quarter of the resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 4, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(4, 16, 3, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(16, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(x))
        if out.shape[-2:] != x.shape[-2:]:  # sides that are not multiples of 4
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def train(images: np.ndarray, epochs: int, seed: int) -> AutoEncoder:
    """Fit on uint8 images [N, C, S, S] (mean squared error, Adam), seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the pipeline's global RNG stays as it was
        torch.manual_seed(seed)
        model = AutoEncoder(images.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), BATCH_SIZE):
            x = prepared.batch(images, order[start : start + BATCH_SIZE]).float() / 255
            loss = F.mse_loss(model(x), x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def reconstruction_errors(model: AutoEncoder, images: np.ndarray) -> np.ndarray:
    """Mean squared error of each image's reconstruction, pixels in [0, 1]."""
    errors = []
    for part in prepared.chunks(len(images), 512):
        x = prepared.batch(images, part).float() / 255
        errors.append(((model(x) - x) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(errors).numpy().astype(np.float64) if errors else np.zeros(0)


def to_arrays(model: AutoEncoder) -> dict[str, np.ndarray]:
    return {f"autoencoder.{k}": v.numpy() for k, v in model.state_dict().items()}


def from_arrays(arrays, channels: int) -> AutoEncoder:
    model = AutoEncoder(channels)
    state = {
        k.removeprefix("autoencoder."): torch.from_numpy(np.array(arrays[k]))
        for k in arrays
        if k.startswith("autoencoder.")
    }
    model.load_state_dict(state)
    return model.eval()
