"""The Fabric training loop: `train_one_epoch`, `evaluate`, `fit`.

Fabric owns device and precision (bf16-mixed on CUDA, 32-true on CPU). One checkpoint per
epoch holds model, optimizer, scheduler, early-stopping state and history; a killed run resumes
from it. The best weights (by validation balanced accuracy) are restored at the end and
written as a model folder (see `skinsense.packaging`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader

from skinsense.config import TrainConfig
from skinsense.data.datasets import CachedImageDataset
from skinsense.data.records import CachedSplit, ImageCache
from skinsense.labels import NUM_CLASSES
from skinsense.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from skinsense.packaging import ModelCard, save_model_dir
from skinsense.presets import make_preset

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainResult(BaseModel):
    """What a finished training leaves: the model folder and its history."""

    arch: str
    model_dir: Path
    checkpoint: Path
    best_epoch: int
    best_val_balanced_accuracy: float
    epochs_run: int
    history: list[dict[str, float]]


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in the targets."""
    support = confusion.sum(dim=1)
    present = support > 0
    recall = confusion.diag()[present].float() / support[present].float()
    return float(recall.mean()) if present.any() else 0.0


def train_one_epoch(fabric: L.Fabric, model: nn.Module, loader: DataLoader, optimizer,
                    scheduler, preset: nn.Module, loss_weights: torch.Tensor | None,
                    label_smoothing: float) -> dict[str, float]:
    """One pass over the training loader; returns mean loss and images/s."""
    model.train()
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    for images, labels in loader:
        logits = model(preset(images))
        loss = F.cross_entropy(logits, labels, weight=loss_weights,
                               label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        scheduler.step()
        total_loss += float(loss.detach()) * labels.shape[0]
        seen += labels.shape[0]
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "images_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, preset: nn.Module) -> dict[str, float]:
    """Validation loss and balanced accuracy."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    total_loss, seen = 0.0, 0
    for images, labels in loader:
        logits = model(preset(images)).float()
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        seen += labels.shape[0]
        pairs = labels.cpu() * NUM_CLASSES + logits.argmax(dim=1).cpu()
        confusion += torch.bincount(pairs, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
    return {"val_loss": total_loss / max(seen, 1), "val_balanced_accuracy": balanced_accuracy(confusion)}


def make_fabric(cfg: TrainConfig) -> L.Fabric:
    """bf16-mixed where CUDA is, full precision on the CPU (bf16 on CPU is slow)."""
    cuda = cfg.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    return L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices,
                    precision="bf16-mixed" if cuda else "32-true")


def _loader(split: CachedSplit, cfg: TrainConfig, *, shuffle: bool) -> DataLoader:
    # The shuffle generator is reseeded per epoch (see `fit`), so a resumed run sees the
    # same order of batches as an uninterrupted one.
    return DataLoader(
        CachedImageDataset(split), batch_size=cfg.batch_size, shuffle=shuffle,
        num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0, drop_last=False,
        generator=torch.Generator() if shuffle else None,
    )


def _cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    cache: ImageCache,
    arch: str,
    cfg: TrainConfig,
    *,
    out_dir: Path,
    class_weights: list[float] | None = None,
    card_extra: dict | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Fine-tune `arch` on the cached training part; resumes from `out_dir/last.ckpt`.

    Args:
        cache: the cached train/val parts at this architecture's size.
        arch: torchvision architecture name.
        cfg: training settings.
        out_dir: where the checkpoint and the model folder go.
        class_weights: loss weights in CLASS_CODES order, or None for an unweighted loss.
        card_extra: fields for the model card (dataset_fingerprint, split_seed, config).
        on_epoch_end: called with (epoch, metrics) after every epoch, e.g. to log to MLflow.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fabric = make_fabric(cfg)
    fabric.seed_everything(cfg.seed)
    model = build_model(arch, pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                        image_size=cache.size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_loader = _loader(cache.train, cfg, shuffle=True)
    val_loader = _loader(cache.val, cfg, shuffle=False)
    shuffle_generator = train_loader.generator
    steps = cfg.epochs * len(train_loader)
    scheduler = _cosine_with_warmup(optimizer, steps, warmup_steps=max(1, steps // 20))
    model, optimizer = fabric.setup(model, optimizer)
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)
    train_preset = make_preset("train", mean=IMAGENET_MEAN, std=IMAGENET_STD).to(fabric.device)
    eval_preset = make_preset("eval", mean=IMAGENET_MEAN, std=IMAGENET_STD).to(fabric.device)
    weights = (torch.tensor(class_weights, dtype=torch.float32, device=fabric.device)
               if class_weights else None)

    ckpt = out_dir / "last.ckpt"
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0,
             "best_score": -1.0, "best_epoch": 0, "history": []}
    if ckpt.exists():
        fabric.load(ckpt, state, strict=True)
        fabric.print(f"{arch}: resumed from {ckpt} after epoch {state['epoch']}")
    best_path = out_dir / "best_weights.pt"

    patience = cfg.early_stopping_patience
    while state["epoch"] < cfg.epochs and state["epoch"] - state["best_epoch"] < patience:
        epoch = state["epoch"] + 1
        # Every source of randomness is seeded from (seed, epoch): resume == uninterrupted.
        fabric.seed_everything(cfg.seed + epoch, verbose=False)
        shuffle_generator.manual_seed(cfg.seed + epoch)
        metrics = train_one_epoch(fabric, model, train_loader, optimizer, scheduler,
                                  train_preset, weights, cfg.label_smoothing)
        metrics |= evaluate(model, val_loader, eval_preset)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        state["history"].append({"epoch": epoch, **metrics})
        if metrics["val_balanced_accuracy"] > state["best_score"]:
            state["best_score"], state["best_epoch"] = metrics["val_balanced_accuracy"], epoch
            fabric.save(best_path, {"model": model})
        state["epoch"] = epoch
        fabric.save(ckpt, state)
        fabric.print(f"{arch} epoch {epoch}/{cfg.epochs}: " +
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    fabric.load(best_path, {"model": model}, strict=True)
    card = ModelCard(arch=arch, image_size=cache.size,
                     metrics={"val_balanced_accuracy": state["best_score"]},
                     **(card_extra or {}))
    model_dir = save_model_dir(getattr(model, "module", model), card, out_dir / "model")
    return TrainResult(arch=arch, model_dir=model_dir, checkpoint=ckpt,
                       best_epoch=state["best_epoch"], best_val_balanced_accuracy=state["best_score"],
                       epochs_run=state["epoch"], history=state["history"])
