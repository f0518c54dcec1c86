"""Transform presets: one for training, one for evaluation, built by one factory.

Images reach the model as uint8 batches (N, 3, H, W) already resized to the training size by
the image cache (training, evaluation) or by `skinsense.data.cache`'s decoder (serving), so
every preset runs on whole batches on the model's device, never per sample in PIL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class EvalPreset(nn.Module):
    """uint8 (N, 3, H, W) -> normalized float (N, 3, H, W) in channels_last memory."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


class TrainPreset(EvalPreset):
    """Per-sample random resized crop, rotation, flips and colour jitter on a whole batch.

    One affine grid per sample does crop, rotation and flips in a single `grid_sample`, so the
    augmentation costs one kernel on the GPU however large the batch is.
    """

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.6, 1.0),
        max_rotation_deg: float = 30.0,
        hflip: bool = True,
        vflip: bool = True,  # dermatoscopy has no "up": vertical flips are as valid as horizontal
        color_jitter: float = 0.1,
    ) -> None:
        super().__init__(mean=mean, std=std)
        self.scale, self.max_rotation_deg = scale, max_rotation_deg
        self.hflip, self.vflip, self.color_jitter = hflip, vflip, color_jitter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        n = x.shape[0]
        x = F.grid_sample(x, self._random_grid(n, x), mode="bilinear",
                          padding_mode="reflection", align_corners=False)
        if self.color_jitter > 0:
            x = self._jitter(x)
        x = (x * 255.0 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def _random_grid(self, n: int, x: torch.Tensor) -> torch.Tensor:
        dev = x.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.empty(n, device=dev).uniform_(lo, hi)

        side = uniform(*self.scale).sqrt()  # crop side as a fraction of the image side
        angle = uniform(-self.max_rotation_deg, self.max_rotation_deg) * math.pi / 180
        tx, ty = (1 - side) * uniform(-1, 1), (1 - side) * uniform(-1, 1)
        sx = side * torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0) if self.hflip else side
        sy = side * torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0) if self.vflip else side
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sy, tx], dim=1),
            torch.stack([sin * sx, cos * sy, ty], dim=1),
        ], dim=1)
        return F.affine_grid(theta, list(x.shape), align_corners=False)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        n, j = x.shape[0], self.color_jitter
        brightness = torch.empty(n, 1, 1, 1, device=x.device).uniform_(1 - j, 1 + j)
        contrast = torch.empty(n, 1, 1, 1, device=x.device).uniform_(1 - j, 1 + j)
        saturation = torch.empty(n, 1, 1, 1, device=x.device).uniform_(1 - j, 1 + j)
        x = x * brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * saturation + gray
        return x.clamp_(0.0, 1.0)


def make_preset(kind: str, *, mean: Sequence[float], std: Sequence[float], **kwargs) -> nn.Module:
    """The one factory: `kind` is 'train' or 'eval'."""
    if kind == "train":
        return TrainPreset(mean=mean, std=std, **kwargs)
    if kind == "eval":
        return EvalPreset(mean=mean, std=std)
    raise ValueError(f"unknown preset {kind!r}; use 'train' or 'eval'")
