"""Random-weight models whose outputs depend on their input, for tests of every architecture.

Pretrained weights cannot be downloaded here, and a freshly initialised network is a poor
stand-in: the EfficientNets shrink activations to ~1e-14 by their last stage, so every input
gives the same logits and features, and any comparison of two backends would "agree".
Batch-norm statistics taken from one random batch keep each layer at unit scale, as trained
weights do.
"""

from __future__ import annotations

import torch

from skinsense.models import build_model, default_image_size

# Input sides small enough for a 2-core machine that each architecture accepts: maxvit_t
# takes only multiples of 224 and the ViTs only their own size; inception_v3 needs 75 px.
_SIZES = {"maxvit_t": 224, "inception_v3": 96}


def small_size(arch: str) -> int:
    """The smallest convenient input side of `arch` for tests (64 px where it can)."""
    if arch.startswith("vit_"):
        return default_image_size(arch)
    return _SIZES.get(arch, 64)


def calibrated_model(arch: str, size: int, batch: torch.Tensor | None = None) -> torch.nn.Module:
    """`arch` with random weights and batch-norm statistics of one batch, in eval mode.

    Args:
        arch: a torchvision architecture.
        size: its input side.
        batch: the (N, 3, size, size) model inputs whose statistics the batch norms take;
            default 16 random normal images. Real images keep a deep random network (the
            EfficientNets) at unit scale on real images too: with statistics of noise its
            features on photos reach the thousands, and two backends' roundings diverge.

    Draws from the global torch RNG: wrap in `torch.random.fork_rng()` with a seed.
    """
    model = build_model(arch, image_size=size)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    model.train()
    # Inception's auxiliary classifier runs in training mode only and needs 299 px inputs;
    # the statistics are taken without it.
    aux = getattr(model, "AuxLogits", None)
    if aux is not None:
        model.AuxLogits = None
    with torch.no_grad():
        model(torch.randn(16, 3, size, size) if batch is None else batch)
    if aux is not None:
        model.AuxLogits = aux
    return model.eval()
