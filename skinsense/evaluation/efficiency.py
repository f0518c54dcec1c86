"""Efficiency of a model: parameter count, weights size, CPU latency and GPU throughput."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from skinsense.evaluation.predict import LoadedModel
from skinsense.lifecycle.packaging import WEIGHTS_FILE
from skinsense.presets import make_preset


def _median_seconds(step, *, repeats: int, warmup: int, sync=None) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        step()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_efficiency(model: LoadedModel | Path, *, repeats: int = 20,
                       warmup: int = 3) -> dict[str, float]:
    """Size of a model folder and its speed: CPU latency, and GPU throughput where CUDA is.

    Args:
        model: the loaded model folder (its network ends up on the GPU where CUDA is, in
            channels-last format), or the folder's path (then loaded here).
        repeats: timed runs; the median is reported, which shrugs off scheduler hiccups.
        warmup: untimed runs first (allocator, oneDNN/cuDNN kernel selection).

    Returns:
        `parameters` (count), `weights_mb` (size of the safetensors file, 10^6 bytes),
        `cpu_latency_ms` (one image of the card's size, batch 1, fp32, preset included) and,
        only when CUDA is available, `gpu_images_per_s` (batch 64, bf16 autocast).
    """
    loaded = model if isinstance(model, LoadedModel) else LoadedModel.load(model)
    card, size = loaded.card, loaded.card.image_size
    result: dict[str, float] = {
        "parameters": float(sum(p.numel() for p in loaded.model.parameters())),
        "weights_mb": (loaded.model_dir / WEIGHTS_FILE).stat().st_size / 1e6,
    }
    preset = make_preset("eval", mean=card.mean, std=card.std)
    # Moved outside inference mode, so the parameters stay ordinary tensors for whatever
    # uses the loaded network next.
    network = loaded.model.to("cpu", memory_format=torch.channels_last)
    # A constant image: timing needs no randomness, and drawing some would move the global RNG.
    image = torch.full((1, 3, size, size), 128, dtype=torch.uint8)
    with torch.inference_mode():
        seconds = _median_seconds(lambda: network(preset(image)), repeats=repeats, warmup=warmup)
    result["cpu_latency_ms"] = seconds * 1e3
    if torch.cuda.is_available():
        device = torch.device("cuda")
        gpu_model, gpu_preset = network.to(device), preset.to(device)
        batch = torch.full((64, 3, size, size), 128, dtype=torch.uint8, device=device)

        def gpu_step() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                gpu_model(gpu_preset(batch))

        seconds = _median_seconds(gpu_step, repeats=repeats, warmup=warmup,
                                  sync=torch.cuda.synchronize)
        result["gpu_images_per_s"] = 64 / seconds
    return result

