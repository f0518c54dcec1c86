"""Architecture registry: any torchvision classification model, with a 7-class head.

`efficientnet_b0` (224 px), `efficientnet_b3` (300 px) and `maxvit_t` (224 px) are the ones
SkinSense trains by default; every other torchvision classification model works by name with
the input size of its ImageNet weights.

The registry also knows two places inside each network:

- the classifier head (the last Linear layer): its input is the *penultimate features* that
  the out-of-domain gate (`skinsense.trust.gate`) measures distances on. `LogitsAndFeatures`
  returns both from one forward pass (what the ONNX export computes);
- the Grad-CAM target layer (`cam_target_layer`): the last convolutional stage of the
  EfficientNets (`features[-1]`) and resnets (`layer4`), the last block of maxvit_t. Other
  architectures get `NoExplanationError`.
"""

from __future__ import annotations

import copy
import re
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


def head_name(model: nn.Module) -> str:
    """The qualified name of the classifier head: the model's last Linear layer."""
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    if last_name is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head")
    return last_name


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], module)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer (the ImageNet classifier) for a `num_classes` one."""
    name = head_name(model)
    _set_submodule(model, name, nn.Linear(model.get_submodule(name).in_features, num_classes))


class LogitsAndFeatures(nn.Module):
    """A classifier split at its head: `forward(x)` returns `(logits, features)`.

    `features` is the input of the head (the penultimate features, (N, D)); `logits` is the
    head applied to them, exactly what the unsplit model returns. The wrapper shares every
    parameter and buffer with the model it was made from (no copy of the weights), so a
    change to one is seen by the other; only the module objects around them are copied,
    with the head in the copy replaced by `nn.Identity`.

    Args:
        model: a model from `build_model` (its head is its last Linear layer).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        name = head_name(model)
        # deepcopy with every tensor in the memo copies the module tree but not one weight.
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.body = copy.deepcopy(model, memo=shared)
        self.head = model.get_submodule(name)
        _set_submodule(self.body, name, nn.Identity())
        self.body.train(model.training)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features

    @property
    def feature_dim(self) -> int:
        """D, the length of one feature vector."""
        return int(self.head.in_features)


class NoExplanationError(ValueError):
    """SkinSense knows no Grad-CAM target layer for this architecture."""


# Grad-CAM target layer per architecture: a regular expression on the arch name, and the
# layer's path (`[-1]` is the last item of a Sequential or ModuleList). The last stage that
# still has a spatial map gives the sharpest class-specific map (Selvaraju et al. 2017).
CAM_TARGET_LAYERS: tuple[tuple[str, str], ...] = (
    (r"efficientnet_(b[0-7]|v2_[sml])", "features[-1]"),
    (r"maxvit_t", "blocks[-1]"),
    (r"(resnet(18|34|50|101|152)|resnext\w+|wide_resnet\w+)", "layer4"),
    # The last convolution block before the pooling, as features[-1] is for the EfficientNets
    # (the small network of the README's offline demo).
    (r"shufflenet_v2_x\d_\d", "conv5"),
)


def cam_target_layer_path(arch: str) -> str:
    """The Grad-CAM target layer's path in `arch` (e.g. 'features[-1]').

    Raises:
        NoExplanationError: the registry names no layer for `arch`.
    """
    for pattern, path in CAM_TARGET_LAYERS:
        if re.fullmatch(pattern, arch):
            return path
    raise NoExplanationError(
        f"no explanation for this architecture: SkinSense knows the Grad-CAM target layer of "
        f"the EfficientNets, maxvit_t, the resnets and ShuffleNetV2, not of {arch}")


def cam_target_layer(model: nn.Module, arch: str) -> nn.Module:
    """The module of `model` (an `arch` from `build_model`) that Grad-CAM explains.

    Raises:
        NoExplanationError: the registry names no layer for `arch`.
    """
    module = model
    for part in re.findall(r"[^.\[\]]+|\[-?\d+\]", cam_target_layer_path(arch)):
        module = module[int(part[1:-1])] if part.startswith("[") else getattr(module, part)
    return module
