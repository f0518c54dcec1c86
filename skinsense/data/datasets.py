"""Torch datasets over the image cache (`skinsense.data.cache`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from skinsense.data.records import CachedSplit


class CachedImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """The images of one cached split, as `(uint8 CHW tensor, label)` pairs.

    The images `.npy` is memory-mapped lazily, once per process: DataLoader workers each
    open their own map (a map inherited through fork or pickled for spawn is never
    reused), and the page cache shares the pages between them.

    Args:
        cached: The split, as `build_split_cache` returned it.
        transform: Optional callable applied to each uint8 CHW tensor (e.g. a CPU
            augmentation); GPU batch augmentation normally happens after collation.
    """

    def __init__(
        self,
        cached: CachedSplit,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images_npy = os.fspath(cached.images_npy)
        self.size = cached.size
        # Labels are small: keep them in memory, also for samplers (`WeightedRandomSampler`).
        self.labels: np.ndarray = np.load(cached.labels_npy).astype(np.int64, copy=False)
        if len(self.labels) != cached.n:
            raise ValueError(
                f"{cached.labels_npy} has {len(self.labels)} labels, the record says {cached.n}"
            )
        self.transform = transform
        self._images: np.ndarray | None = None
        self._owner_pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Copy the row out of the read-only map: torch warns on (and must not write to)
        # non-writable memory.
        image = torch.from_numpy(np.array(self._array()[index])).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def _array(self) -> np.ndarray:
        if self._images is None or self._owner_pid != os.getpid():
            images = np.load(self.images_npy, mmap_mode="r")
            if images.shape[0] != len(self.labels) or images.shape[1:] != (self.size,
                                                                          self.size, 3):
                raise ValueError(
                    f"{self.images_npy} has shape {images.shape}, expected "
                    f"({len(self.labels)}, {self.size}, {self.size}, 3)"
                )
            self._images, self._owner_pid = images, os.getpid()
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get the path, not the map.
        state = self.__dict__.copy()
        state["_images"] = None
        state["_owner_pid"] = None
        return state


def load_split_tensors(cached: CachedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole cached split into memory (for small sets, e.g. validation on GPU).

    Args:
        cached: The split, as `build_split_cache` returned it.

    Returns:
        `(images, labels)`: a uint8 `(N, size, size, 3)` (NHWC) tensor and an int64 `(N,)`
        tensor.
    """
    images = np.load(cached.images_npy)
    labels = np.load(cached.labels_npy).astype(np.int64, copy=False)
    if images.shape != (cached.n, cached.size, cached.size, 3) or labels.shape != (cached.n,):
        raise ValueError(
            f"cache files do not match the record: images {images.shape}, labels "
            f"{labels.shape}, expected n={cached.n}, size={cached.size}"
        )
    return torch.from_numpy(images), torch.from_numpy(labels)
