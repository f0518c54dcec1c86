"""The training loop on a CUDA device: bf16-mixed steps, channels_last, uint8 over PCIe."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from skinsense.config import TrainConfig
from skinsense.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from skinsense.presets import make_preset
from skinsense.training.batches import BatchedCacheLoader, to_device_ahead
from skinsense.training.loop import (
    configure_backends,
    fit,
    make_fabric,
    resolve_precision,
    train_one_epoch,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_auto_precision_is_bf16_mixed_on_cuda():
    cfg = TrainConfig(archs=["resnet18"], pretrained=False)
    assert resolve_precision(cfg, cuda=True) == "bf16-mixed"
    fabric = make_fabric(cfg)
    assert fabric.device.type == "cuda"
    a = torch.randn(8, 8, device=fabric.device)
    with fabric.autocast():
        assert (a @ a).dtype == torch.bfloat16


def test_bf16_mixed_steps_train_a_channels_last_model_on_the_gpu():
    fabric = L.Fabric(accelerator="cuda", devices=1, precision="bf16-mixed")
    model = build_model("resnet18", image_size=64).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    preset = make_preset("train", mean=IMAGENET_MEAN, std=IMAGENET_STD).to(fabric.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 7, (16,), generator=generator)
    batches = [(images, labels)] * 8  # one batch seen 8 times: the loss must fall

    inputs = preset(images.cuda())
    assert inputs.is_cuda and inputs.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(inputs).dtype in (torch.bfloat16, torch.float32)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.dtype == torch.float32  # master weights fp32
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)

    first = train_one_epoch(fabric, model, batches[:1], optimizer, scheduler, preset)
    later = train_one_epoch(fabric, model, batches, optimizer, scheduler, preset,
                            grad_clip_norm=1.0, grad_accum_steps=2)
    assert torch.isfinite(torch.tensor(later["train_loss"]))
    assert later["train_loss"] < first["train_loss"]


def test_batched_loader_sends_pinned_uint8_to_the_gpu(cached_sample):
    cache, _ = cached_sample
    loader = BatchedCacheLoader(cache.train, batch_size=16, shuffle=True, pin_memory=True)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.is_pinned() and labels.is_pinned()
    on_gpu = images.to("cuda", non_blocking=True)
    assert on_gpu.is_contiguous(memory_format=torch.channels_last)


def test_fit_on_the_gpu_uses_bf16_and_writes_a_model(cached_sample, tmp_path):
    cache, _ = cached_sample
    cfg = TrainConfig(archs=["resnet18"], epochs=1, batch_size=32, pretrained=False,
                      progress=False)
    result = fit(cache, "resnet18", cfg, out_dir=tmp_path / "run")
    assert result.epochs_run == 1 and any(result.model_dir.iterdir())
    assert result.history[0]["images_per_s"] > 0
    # The backend flags the ceiling runs with were set by the training itself.
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32


def test_backend_flags_follow_the_config_on_cuda():
    exact = TrainConfig(archs=["resnet18"], pretrained=False, cudnn_benchmark=False,
                        precision="32-true")
    configure_backends(exact, make_fabric(exact))
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    default = TrainConfig(archs=["resnet18"], pretrained=False)
    configure_backends(default, make_fabric(default))
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32


def test_batches_copied_ahead_on_a_side_stream_arrive_intact():
    # Distinct batches, each used by slow work on the compute stream while the next one is
    # copied: a missing wait or record_stream shows up as a batch with another's values.
    host = [(torch.full((64, 3, 96, 96), i, dtype=torch.uint8).pin_memory(),
             torch.full((64,), i, dtype=torch.int64).pin_memory()) for i in range(24)]
    weight = torch.randn(2048, 2048, device="cuda")
    seen = []
    for images, labels in to_device_ahead(host, torch.device("cuda")):
        assert images.is_cuda and labels.is_cuda
        assert images.is_contiguous()
        for _ in range(4):
            weight = torch.tanh(weight @ weight)  # keeps the compute stream busy
        seen.append((images.float().mean(), labels.float().mean()))
        del images, labels  # frees the memory for the allocator to reuse
    torch.cuda.synchronize()
    assert [(int(a), int(b)) for a, b in seen] == [(i, i) for i in range(24)]


def test_a_training_child_on_cuda_gets_a_gpu_of_its_own(cached_sample, tmp_path, capsys):
    from skinsense.training.gpus import reserve_gpus, visible_gpus
    from skinsense.training.launcher import train_in_subprocess

    cache, _ = cached_sample
    gpus, locks = visible_gpus(), tmp_path / "locks"
    cfg = TrainConfig(archs=["resnet18"], epochs=1, batch_size=32, pretrained=False,
                      progress=False)
    result = train_in_subprocess(cache, "resnet18", cfg, out_dir=tmp_path / "run",
                                 gpu_lock_dir=locks)
    assert f"resnet18 on GPU(s) {gpus[0]}" in capsys.readouterr().out
    assert result.epochs_run == 1 and result.history[0]["images_per_s"] > 0
    with reserve_gpus(len(gpus), gpus, lock_dir=locks, timeout_s=0):
        pass  # the child's reservation ended with it
