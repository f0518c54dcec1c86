"""The Fabric training loop: `train_one_epoch`, `evaluate`, `fit`.

Fabric owns device and precision (bf16-mixed on CUDA, 32-true on CPU). Batches come from the
uint8 image cache (`BatchedCacheLoader`) and are augmented on the device by the presets. One
checkpoint per epoch holds model, optimizer, scheduler, early-stopping state and history; a
killed run resumes from it and ends as an uninterrupted one would. The best weights (by
validation balanced accuracy) are restored at the end and written as a model folder (see
`skinsense.lifecycle.packaging`).

With `devices > 1` this module runs inside processes started by torchrun
(`skinsense.training.launcher`); `fit` refuses to start DDP processes itself, because
Fabric's launcher would re-execute whatever script imported it (a Prefect flow, the CLI).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader

from skinsense.config import TrainConfig
from skinsense.data.datasets import CachedImageDataset
from skinsense.data.extra_sources import feedback_ids_in
from skinsense.data.records import CachedSplit, ImageCache
from skinsense.labels import NUM_CLASSES
from skinsense.lifecycle.packaging import ModelCard, save_model_dir
from skinsense.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from skinsense.presets import make_preset
from skinsense.training.batches import BatchedCacheLoader, to_device_ahead

EpochCallback = Callable[[int, dict[str, float]], None]
Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]


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


def train_one_epoch(fabric: L.Fabric, model: nn.Module, loader: Loader, optimizer, scheduler,
                    preset: nn.Module, *, loss_weights: torch.Tensor | None = None,
                    label_smoothing: float = 0.0, grad_accum_steps: int = 1,
                    grad_clip_norm: float | None = None, progress=None) -> dict[str, float]:
    """One pass over the training batches; returns mean loss and images/s.

    Args:
        fabric: The Fabric that set up `model` and `optimizer`.
        model: The model, set up by Fabric.
        loader: `(uint8 images, labels)` batches, on the host or already on the device.
        optimizer: Set up by Fabric.
        scheduler: Stepped once per optimizer step.
        preset: Turns uint8 batches into normalized (augmented) float batches.
        loss_weights: Per-class loss weights, or None.
        label_smoothing: Cross-entropy label smoothing.
        grad_accum_steps: Batches per optimizer step; the loss is averaged over them, so
            k batches of b give the gradient of one batch of k*b (without batch norm).
        grad_clip_norm: Clip the global gradient norm to this before each step.
        progress: Optional tqdm-like bar, advanced once per batch.
    """
    model.train()
    n_batches = len(loader)  # type: ignore[arg-type]
    total_loss, seen = torch.zeros((), device=fabric.device), 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(to_device_ahead(loader, fabric.device)):
        group_start = i - i % grad_accum_steps
        group = min(grad_accum_steps, n_batches - group_start)  # the last group may be short
        stepping = i == group_start + group - 1
        # Only the last batch of a group all-reduces gradients under DDP.
        with fabric.no_backward_sync(model, enabled=not stepping):
            logits = model(preset(images)).float()
            loss = F.cross_entropy(logits, labels, weight=loss_weights,
                                   label_smoothing=label_smoothing)
            fabric.backward(loss / group)
        if stepping:
            if grad_clip_norm is not None:
                # error_if_nonfinite would read the norm back every step (a GPU stall); a
                # non-finite loss is caught once per epoch instead (see `fit`).
                fabric.clip_gradients(model, optimizer, max_norm=grad_clip_norm,
                                      error_if_nonfinite=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        # Summed on the device: a float() per step would stall the GPU every step.
        total_loss += loss.detach() * labels.shape[0]
        seen += labels.shape[0]
        if progress is not None:
            progress.update(1)
    mean_loss = float(total_loss) / max(seen, 1)  # waits for the last step to finish
    elapsed = time.perf_counter() - start
    return {"train_loss": mean_loss, "images_per_s": seen * fabric.world_size / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(fabric: L.Fabric, model: nn.Module, loader: Loader,
             preset: nn.Module) -> dict[str, float]:
    """Validation loss and balanced accuracy, summed over all DDP processes."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long, device=fabric.device)
    total_loss = torch.zeros((), dtype=torch.float64, device=fabric.device)
    for images, labels in to_device_ahead(loader, fabric.device):
        logits = model(preset(images)).float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum")
        pairs = labels * NUM_CLASSES + logits.argmax(dim=1)
        confusion += torch.bincount(pairs, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
    if fabric.world_size > 1:
        confusion = fabric.all_reduce(confusion, reduce_op="sum")
        total_loss = fabric.all_reduce(total_loss, reduce_op="sum")
    confusion = confusion.cpu()
    return {"val_loss": float(total_loss) / max(int(confusion.sum()), 1),
            "val_balanced_accuracy": balanced_accuracy(confusion)}


def resolve_precision(cfg: TrainConfig, *, cuda: bool) -> str:
    """`cfg.precision`, with 'auto' meaning bf16-mixed on CUDA and 32-true elsewhere."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16-mixed" if cuda else "32-true"


def make_fabric(cfg: TrainConfig) -> L.Fabric:
    """The Fabric for `cfg`: DDP over `devices` x `num_nodes` processes when that is more
    than one (inside torchrun's processes only)."""
    cuda = cfg.may_use_cuda and torch.cuda.is_available()
    if cfg.world_size > 1 and "LOCAL_RANK" not in os.environ:
        raise RuntimeError(
            f"devices={cfg.devices} on num_nodes={cfg.num_nodes} needs one process per device: "
            f"train with skinsense.training.launcher.train_in_subprocess (it starts torchrun), "
            f"not fit()"
        )
    return L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                    strategy="ddp" if cfg.world_size > 1 else "auto",
                    precision=resolve_precision(cfg, cuda=cuda))  # type: ignore[arg-type]


def make_loaders(cache: ImageCache, cfg: TrainConfig,
                 fabric: L.Fabric) -> tuple[Loader, Loader, Callable[[int], None]]:
    """Training and validation batches, and `reseed(epoch)` that fixes an epoch's order."""
    # A last batch of one image breaks batch norm in training mode; the order changes every
    # epoch, so dropping the incomplete batch leaves no image out for good.
    drop_last = cache.train.n // fabric.world_size >= cfg.batch_size
    if cfg.loader == "batched":
        common = {"batch_size": cfg.batch_size, "pin_memory": fabric.device.type == "cuda",
                  "rank": fabric.global_rank, "world_size": fabric.world_size}
        train = BatchedCacheLoader(cache.train, shuffle=True, seed=cfg.seed, drop_last=drop_last,
                                   **common)
        val = BatchedCacheLoader(cache.val, shuffle=False, **common)
        return train, val, train.set_epoch
    train_dl = _loader(cache.train, cfg, shuffle=True, drop_last=drop_last)
    val_dl = _loader(cache.val, cfg, shuffle=False)
    generator = train_dl.generator
    train_dl, val_dl = fabric.setup_dataloaders(train_dl, val_dl)

    def reseed(epoch: int) -> None:
        generator.manual_seed(cfg.seed + epoch)
        if hasattr(train_dl.sampler, "set_epoch"):  # DistributedSampler under DDP
            train_dl.sampler.set_epoch(epoch)

    return train_dl, val_dl, reseed


def _loader(split: CachedSplit, cfg: TrainConfig, *, shuffle: bool,
            drop_last: bool = False) -> DataLoader:
    # The shuffle generator is reseeded per epoch (see `fit`), so a resumed run sees the
    # same order of batches as an uninterrupted one.
    return DataLoader(
        CachedImageDataset(split), batch_size=cfg.batch_size, shuffle=shuffle,
        num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0, drop_last=drop_last,
        generator=torch.Generator() if shuffle else None,
    )


def _cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure_backends(cfg: TrainConfig, fabric: L.Fabric) -> None:
    """CUDA backend flags for training: what the model-bound ceiling runs with.

    cuDNN autotuning (`cfg.cudnn_benchmark`) pays off because every training batch has the
    same shape. Under mixed precision the few matmuls left in float32 may use TF32; with
    precision '32-true' float32 stays exact.
    """
    if fabric.device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    mixed = resolve_precision(cfg, cuda=True).endswith("-mixed")
    torch.backends.cuda.matmul.allow_tf32 = mixed


def _maybe_compile(model: nn.Module, cfg: TrainConfig, fabric: L.Fabric) -> nn.Module:
    if not cfg.compile:
        return model
    # Inductor on the CPU compiles for minutes and gains little: only an explicit
    # accelerator='cpu' asks for it; 'auto' that fell back to the CPU does not.
    if fabric.device.type != "cuda" and cfg.accelerator == "auto":
        fabric.print(f"compile=True skipped: training runs on {fabric.device.type}, not CUDA "
                     f"(set accelerator='cpu' to compile there anyway)", flush=True)
        return model
    return torch.compile(model)


def _progress_bar(cfg: TrainConfig, fabric: L.Fabric, total: int, desc: str):
    # A bar only where someone watches a terminal; pipes and logs get one line per epoch.
    if not (cfg.progress and fabric.is_global_zero and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit="batch")


def setup_training(cache: ImageCache, arch: str, cfg: TrainConfig, fabric: L.Fabric):
    """Everything `fit` trains with, set up by `fabric` (also used by the benchmark).

    Returns:
        `(model, optimizer, scheduler, train_loader, val_loader, reseed, (train_preset,
        eval_preset))`; `reseed(epoch)` fixes the order of that epoch's batches.
    """
    configure_backends(cfg, fabric)
    model = build_model(arch, pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                        image_size=cache.size)
    model = model.to(fabric.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The fused CUDA AdamW updates all parameters in a few kernels instead of a dozen passes.
    cuda = fabric.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=cuda or None)
    train_loader, val_loader, reseed = make_loaders(cache, cfg, fabric)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)  # type: ignore[arg-type]
    scheduler = _cosine_with_warmup(optimizer, cfg.epochs * steps_per_epoch,
                                    warmup_steps=round(cfg.warmup_epochs * steps_per_epoch))
    model, optimizer = fabric.setup(_maybe_compile(model, cfg, fabric), optimizer)
    presets = [make_preset(kind, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           channels_last=cfg.channels_last).to(fabric.device)
               for kind in ("train", "eval")]
    return model, optimizer, scheduler, train_loader, val_loader, reseed, presets


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
        on_epoch_end: called (on rank 0) with (epoch, metrics) after every epoch, e.g. to
            log to MLflow.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fabric = make_fabric(cfg)
    if cfg.world_size > 1:
        fabric.launch()  # inside torchrun's processes this only joins the process group
    fabric.seed_everything(cfg.seed)
    model, optimizer, scheduler, train_loader, val_loader, reseed, (train_preset, eval_preset) = (
        setup_training(cache, arch, cfg, fabric))
    weights = (torch.tensor(class_weights, dtype=torch.float32, device=fabric.device)
               if class_weights else None)
    ckpt, best_path = out_dir / "last.ckpt", out_dir / "best_weights.pt"
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0,
             "best_score": -1.0, "best_epoch": 0, "history": []}
    if ckpt.exists():
        fabric.load(ckpt, state, strict=True)
        fabric.print(f"{arch}: resumed from {ckpt} after epoch {state['epoch']}", flush=True)

    while (state["epoch"] < cfg.epochs
           and state["epoch"] - state["best_epoch"] < cfg.early_stopping_patience):
        epoch = state["epoch"] + 1
        # Every source of randomness is seeded from (seed, epoch): resume == uninterrupted.
        fabric.seed_everything(cfg.seed + epoch, verbose=False)
        reseed(epoch)
        bar = _progress_bar(cfg, fabric, len(train_loader), f"{arch} {epoch}/{cfg.epochs}")
        metrics = train_one_epoch(
            fabric, model, train_loader, optimizer, scheduler, train_preset, loss_weights=weights,
            label_smoothing=cfg.label_smoothing, grad_accum_steps=cfg.grad_accum_steps,
            grad_clip_norm=cfg.grad_clip_norm, progress=bar)
        if bar is not None:
            bar.close()
        if not math.isfinite(metrics["train_loss"]):
            # Raised before this epoch is checkpointed: last.ckpt and the best weights are
            # still those of the last finite epoch.
            kept = (f"the checkpoint of epoch {state['epoch']} in {ckpt} is kept"
                    if state["epoch"] else "nothing was checkpointed")
            raise FloatingPointError(
                f"{arch}: the training loss became {metrics['train_loss']} in epoch {epoch} "
                f"(lr={cfg.lr}). Lower lr, keep grad_clip_norm set, or use precision="
                f"'32-true'; {kept}")
        metrics |= evaluate(fabric, model, val_loader, eval_preset)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        _end_epoch(fabric, state, epoch, metrics, ckpt, best_path)
        fabric.print(f"{arch} epoch {epoch}/{cfg.epochs}: " +
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if on_epoch_end is not None and fabric.is_global_zero:
            on_epoch_end(epoch, metrics)
    return _finish(fabric, cache, arch, state, model, out_dir, best_path, card_extra)


def _end_epoch(fabric: L.Fabric, state: dict, epoch: int, metrics: dict[str, float],
               ckpt: Path, best_path: Path) -> None:
    state["history"].append({"epoch": epoch, **metrics})
    if metrics["val_balanced_accuracy"] > state["best_score"]:
        state["best_score"], state["best_epoch"] = metrics["val_balanced_accuracy"], epoch
        fabric.save(best_path, {"model": state["model"]})
    state["epoch"] = epoch
    fabric.save(ckpt, state)  # rank 0 writes; every rank waits for it


def _finish(fabric: L.Fabric, cache: ImageCache, arch: str, state: dict, model: nn.Module,
            out_dir: Path, best_path: Path, card_extra: dict | None) -> TrainResult:
    fabric.load(best_path, {"model": model}, strict=True)
    model_dir = out_dir / "model"
    if fabric.is_global_zero:
        card = ModelCard(arch=arch, image_size=cache.size,
                         metrics={"val_balanced_accuracy": state["best_score"]},
                         trained_feedback_ids=feedback_ids_in(cache.train.manifest_csv),
                         **(card_extra or {}))
        save_model_dir(getattr(model, "module", model), card, model_dir)
    fabric.barrier()
    return TrainResult(arch=arch, model_dir=model_dir, checkpoint=out_dir / "last.ckpt",
                       best_epoch=state["best_epoch"],
                       best_val_balanced_accuracy=state["best_score"],
                       epochs_run=state["epoch"], history=state["history"])
