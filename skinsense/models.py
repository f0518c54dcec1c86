"""Architecture registry: any torchvision classification model, with a 7-class head.

`efficientnet_b0` (224 px), `efficientnet_b3` (300 px) and `maxvit_t` (224 px) are the ones
SkinSense trains by default; every other torchvision classification model works by name with
the input size of its ImageNet weights.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import torchvision
from torch import nn

from skinsense.labels import NUM_CLASSES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Models whose graph fixes the input size: MaxViT partitions the feature map into 7x7 windows
# at every stage (so the side must be a multiple of 224), ViTs learn one position embedding
# per patch of their training size.
_SIZE_MULTIPLE = {"maxvit_t": 224}
_SIZE_EXACT_PREFIX = ("vit_",)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded."""


@cache
def available_archs() -> tuple[str, ...]:
    """Names of all torchvision classification models, sorted."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def default_image_size(arch: str) -> int:
    """The input side of the arch's ImageNet weights (e.g. 300 for efficientnet_b3)."""
    _check_arch(arch)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return int(weights.transforms().crop_size[0])


def check_image_size(arch: str, size: int) -> None:
    """Raise ValueError when `arch` cannot take square inputs of side `size`."""
    multiple = _SIZE_MULTIPLE.get(arch)
    if multiple and size % multiple:
        raise ValueError(
            f"{arch} takes only input sizes that are multiples of {multiple} px (got {size}); "
            f"leave image_size empty to use its default or choose another architecture"
        )
    if arch.startswith(_SIZE_EXACT_PREFIX) and size != default_image_size(arch):
        raise ValueError(f"{arch} takes only {default_image_size(arch)} px inputs (got {size})")


def build_model(
    arch: str,
    *,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    image_size: int | None = None,
    num_classes: int = NUM_CLASSES,
) -> nn.Module:
    """Build `arch` with a fresh `num_classes` head.

    Args:
        arch: a torchvision classification model name.
        pretrained: start from torchvision's ImageNet weights (downloaded once into TORCH_HOME).
        weights_path: a local file with the ImageNet state dict, for machines without network.
        image_size: input side; checked against what the architecture accepts.
        num_classes: size of the new head.

    Raises:
        WeightsUnavailableError: pretrained weights were asked for and cannot be had. There is
            never a silent fallback to random weights.
    """
    _check_arch(arch)
    size = image_size or default_image_size(arch)
    check_image_size(arch, size)
    kwargs = {"image_size": size} if arch.startswith(_SIZE_EXACT_PREFIX) else {}
    if arch == "maxvit_t":
        kwargs = {"input_size": (size, size)}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if weights_path is not None:
        model.load_state_dict(_load_local_weights(Path(weights_path), arch))
    elif pretrained:
        model.load_state_dict(_download_weights(arch))
    _replace_head(model, num_classes)
    return model


def _check_arch(arch: str) -> None:
    if arch not in available_archs():
        raise ValueError(
            f"unknown architecture {arch!r}; use a torchvision classification model name, "
            f"e.g. efficientnet_b0, efficientnet_b3, maxvit_t, resnet50"
        )


def _download_weights(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, SSL, hash mismatch: all mean "no usable weights"
        raise WeightsUnavailableError(
            f"could not load ImageNet weights for {arch} from {weights.url} ({exc}). "
            f"Put the file into $TORCH_HOME/hub/checkpoints/ (torch's cache), pass a local "
            f"file with weights_path / --weights PATH, or train from scratch with "
            f"pretrained=false / --no-pretrained."
        ) from exc


def _load_local_weights(path: Path, arch: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} for {arch} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            # weights_only: a weights file must never be able to run code when loaded.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer (the ImageNet classifier) for a `num_classes` one."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None or last_name is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head to replace")
    parent = model.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else model
    setattr(parent, last_name.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))
