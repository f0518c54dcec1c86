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
    """uint8 (N, 3, H, W) -> normalized float (N, 3, H, W), channels_last memory by default."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float],
                 channels_last: bool = True) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


class TrainPreset(EvalPreset):
    """Per-sample random resized crop, rotation, flips and colour jitter on a whole batch.

    One affine grid per sample does crop, rotation and flips in a single `grid_sample`, so the
    augmentation costs one kernel on the GPU however large the batch is. The crop follows
    torchvision's `RandomResizedCrop`: its area is a uniform fraction `scale` of the image,
    its aspect ratio log-uniform in `ratio`, its position uniform where it fits; it is then
    rotated about its centre (corners that leave the image are filled by reflection) and
    resampled to the input size. Inputs are square (the cache squashes every image), so
    normalized grid coordinates rotate without distortion.

    Args:
        mean: Per-channel normalization mean (0-1 scale).
        std: Per-channel normalization std (0-1 scale).
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's width / height.
        max_rotation_deg: Rotation is uniform in +-this.
        hflip: Mirror left-right with probability 1/2.
        vflip: Mirror top-bottom with probability 1/2.
        color_jitter: Brightness, contrast and saturation factors uniform in 1 +- this.
        channels_last: Return channels_last memory (what cuDNN's fastest kernels take).
    """

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        # Lesions fill the middle of the image: torchvision's 0.08 lower bound would often
        # crop the lesion out and teach the label from skin alone.
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        max_rotation_deg: float = 30.0,
        hflip: bool = True,
        vflip: bool = True,  # dermatoscopy has no "up": vertical flips are as valid as horizontal
        color_jitter: float = 0.1,
        channels_last: bool = True,
    ) -> None:
        super().__init__(mean=mean, std=std, channels_last=channels_last)
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                             f"got scale={scale}, ratio={ratio}")
        self.scale, self.ratio, self.max_rotation_deg = scale, ratio, max_rotation_deg
        self.hflip, self.vflip, self.color_jitter = hflip, vflip, color_jitter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        n = x.shape[0]
        x = F.grid_sample(x, self._random_grid(n, x), mode="bilinear",
                          padding_mode="reflection", align_corners=False)
        if self.color_jitter > 0:
            x = self._jitter(x)
        x = (x * 255.0 - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def _random_grid(self, n: int, x: torch.Tensor) -> torch.Tensor:
        dev = x.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.empty(n, device=dev).uniform_(lo, hi)

        area = uniform(*self.scale)
        aspect = uniform(math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
        # Crop width and height as fractions of the image side (a side is 2 in grid units);
        # clamped so an extreme aspect never asks for more than the whole image.
        width = (area * aspect).sqrt().clamp(max=1.0)
        height = (area / aspect).sqrt().clamp(max=1.0)
        angle = uniform(-self.max_rotation_deg, self.max_rotation_deg) * math.pi / 180
        tx, ty = (1 - width) * uniform(-1, 1), (1 - height) * uniform(-1, 1)
        def random_sign() -> torch.Tensor:
            return torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)

        sx = width * random_sign() if self.hflip else width
        sy = height * random_sign() if self.vflip else height
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
    """The one factory: `kind` is 'train' or 'eval'; keyword arguments go to the preset."""
    if kind == "train":
        return TrainPreset(mean=mean, std=std, **kwargs)
    if kind == "eval":
        return EvalPreset(mean=mean, std=std, **kwargs)
    raise ValueError(f"unknown preset {kind!r}; use 'train' or 'eval'")
