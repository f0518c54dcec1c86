"""Training throughput: SkinSense's own training step against the model-bound ceiling.

For each architecture, in one process on one device:

  ceiling   - exactly `../shared/bench/gpu_anchor.py` mode `ceil`: torchvision model with a
              7-class head, bf16 autocast, channels_last, eager, AdamW(lr=1e-4), one static
              random batch already on the GPU (no data pipeline at all);
  pipeline  - the project's training step through its real data path: synthetic 600x450
              JPEGs (`skinsense.data.synth`) put through the image cache
              (`skinsense.data.cache`) at the arch's size, then `setup_training` and
              `train_one_epoch` of `skinsense.training.loop` (BatchedCacheLoader with pinned
              uint8 batches, TrainPreset augmentation on the GPU, Fabric bf16-mixed,
              channels_last, AdamW, gradient clipping as TrainConfig's defaults);
  static    - the same loop fed one uint8 batch that already sits on the device (what the
              loop itself costs over the ceiling: augmentation, Fabric, clipping);
  loader    - the data path alone: cache batches copied to the device, images/s.

Eager figures come first for every architecture; with --compile, the architectures in
--compile-archs are then measured again with torch.compile (ceiling: the step function, as
gpu_anchor's `ceilc`; pipeline: TrainConfig(compile=True), i.e. the model). Results are
rewritten after each step, so a run cut short keeps what it measured. Target: pipeline
>= 0.95 x ceiling in eager mode at batch 64.

GPU machine (needs torch, torchvision, lightning, numpy, pandas, pillow and pydantic; the
GPU image has no pydantic, carry it as wheels, see bench/RESULTS.md):
  PYTHONPATH=. python3 bench/train_throughput.py [--archs ...] [--batch 64] [--steps 200]
CPU smoke test:
  PYTHONPATH=. python3 bench/train_throughput.py --device cpu --archs resnet18 --steps 2 \\
      --warmup 1 --batch 4 --images 24 --size-override 32 --workers 1
Writes train_throughput.json and train_throughput.md into $OUT when it is set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import torchvision
from torch import nn

from skinsense.config import TrainConfig
from skinsense.data.cache import build_split_cache
from skinsense.data.records import CachedSplit, ImageCache
from skinsense.data.synth import (
    IMAGES_PART_1_ZIP,
    IMAGES_PART_2_ZIP,
    METADATA_CSV,
    make_synthetic_ham10000,
)
from skinsense.training.batches import BatchedCacheLoader
from skinsense.training.loop import setup_training, train_one_epoch

ARCHS = {"efficientnet_b0": 224, "efficientnet_b3": 300, "maxvit_t": 224}
TARGET_RATIO = 0.95


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ceiling(arch: str, size: int, *, batch: int, warmup: int, steps: int, device: torch.device,
            compile_step: bool) -> float:
    """gpu_anchor.py's `ceil` (or `ceilc`), counted in steps instead of seconds."""
    model = getattr(torchvision.models, arch)(num_classes=7).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lossf = nn.CrossEntropyLoss()
    amp = device.type == "cuda"  # bf16 autocast on the CPU is slow: fp32 there (smoke test)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = lossf(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if compile_step else step
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device=device)
    for _ in range(warmup):
        run(x, y)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run(x, y)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


class _Steps:
    """Exactly `steps` batches from a loader, starting a new epoch (order) when it runs out."""

    def __init__(self, loader: BatchedCacheLoader, steps: int, first_epoch: int) -> None:
        self.loader, self.steps, self.epoch = loader, steps, first_epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        given = 0
        while given < self.steps:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            for batch in self.loader:
                if given == self.steps:
                    return
                given += 1
                yield batch


def pipeline(split: CachedSplit, arch: str, *, batch: int, warmup: int, steps: int,
             accelerator: str, compile_model: bool, static: bool = True) -> dict[str, float]:
    """Images/s of the project's own loop: fed by the loader, on a static device batch, and
    of the loader alone."""
    cfg = TrainConfig(archs=[arch], image_size=split.size, batch_size=batch, pretrained=False,
                      epochs=1, lr=1e-4, accelerator=accelerator, compile=compile_model,
                      progress=False)
    fabric = L.Fabric(accelerator=accelerator, devices=1,
                      precision="bf16-mixed" if accelerator == "cuda" else "32-true")
    cache = ImageCache(size=split.size, key="bench", train=split, val=split, test=split)
    model, optimizer, scheduler, train_loader, _, _, (train_preset, _) = setup_training(
        cache, arch, cfg, fabric)

    def run(batches) -> float:
        return train_one_epoch(fabric, model, batches, optimizer, scheduler, train_preset,
                               grad_clip_norm=cfg.grad_clip_norm,
                               grad_accum_steps=cfg.grad_accum_steps)["images_per_s"]

    run(_Steps(train_loader, warmup, 0))
    figures = {"pipeline": run(_Steps(train_loader, steps, 1000))}
    if static:
        on_device = fabric.to_device(next(iter(train_loader)))
        figures["static"] = run([on_device] * steps)
    start, seen = time.perf_counter(), 0
    for images, _labels in _Steps(train_loader, steps, 2000):
        seen += len(fabric.to_device(images))
    _sync(fabric.device)
    figures["loader"] = seen / (time.perf_counter() - start)
    return figures


def synthetic_split(work: Path, n_images: int, size: int, workers: int | None) -> CachedSplit:
    """N synthetic 600x450 JPEGs (made once per work folder) cached at `size` px."""
    data = work / "synth"
    if not (data / METADATA_CSV).exists() or len(pd.read_csv(data / METADATA_CSV)) != n_images:
        started = time.perf_counter()
        make_synthetic_ham10000(data, n_images=n_images, seed=0, workers=workers)
        print(f"generated {n_images} synthetic 600x450 JPEGs in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    images_dir = data / "images"
    manifest = pd.read_csv(data / METADATA_CSV, dtype=str)
    manifest["image_path"] = [str(images_dir / f"{i}.jpg") for i in manifest["image_id"]]
    if not all(Path(p).exists() for p in manifest["image_path"]):
        images_dir.mkdir(exist_ok=True)
        for part in (IMAGES_PART_1_ZIP, IMAGES_PART_2_ZIP):
            with zipfile.ZipFile(data / part) as archive:
                archive.extractall(images_dir)
    started = time.perf_counter()
    split = build_split_cache(manifest, size=size, out_dir=work / "cache", name=f"train{size}",
                              workers=workers)
    print(f"cache at {size} px: {time.perf_counter() - started:.1f} s", flush=True)
    return split


def _guarded(label: str, measure: Callable[[], float]) -> float:
    try:
        return measure()
    except Exception as exc:  # report and go on with the other measurements
        print(f"{label} failed: {exc!r}"[:400], flush=True)
        return math.nan


def measure_eager(arch: str, size: int, args: argparse.Namespace, split: CachedSplit) -> dict:
    device = torch.device(args.device)
    common = {"batch": args.batch, "warmup": args.warmup, "steps": args.steps}
    row: dict = {"arch": arch, "size": size, "batch": args.batch, "steps": args.steps}
    row["ceiling_images_per_s"] = _guarded(f"{arch} ceiling", lambda: ceiling(
        arch, size, device=device, compile_step=False, **common))
    figures = {"pipeline": math.nan, "static": math.nan, "loader": math.nan}
    try:
        figures |= pipeline(split, arch, accelerator=_accelerator(device), compile_model=False,
                            **common)
    except Exception as exc:
        print(f"{arch} pipeline failed: {exc!r}"[:400], flush=True)
    row |= {"pipeline_images_per_s": figures["pipeline"],
            "static_images_per_s": figures["static"],
            "loader_images_per_s": figures["loader"],
            "ratio": figures["pipeline"] / row["ceiling_images_per_s"]}
    _free(device)
    print(json.dumps(row), flush=True)
    return row


def measure_compiled(row: dict, args: argparse.Namespace, split: CachedSplit) -> None:
    device, arch = torch.device(args.device), row["arch"]
    common = {"batch": args.batch, "warmup": args.warmup, "steps": args.steps}
    started = time.perf_counter()
    row["ceiling_compiled_images_per_s"] = _guarded(f"{arch} ceiling compiled", lambda: ceiling(
        arch, row["size"], device=device, compile_step=True, **common))
    row["pipeline_compiled_images_per_s"] = _guarded(f"{arch} pipeline compiled", lambda: (
        pipeline(split, arch, accelerator=_accelerator(device), compile_model=True,
                 static=False, **common)["pipeline"]))
    row["ratio_compiled"] = row["pipeline_compiled_images_per_s"] / row["ceiling_compiled_images_per_s"]
    row["compile_gain"] = row["pipeline_compiled_images_per_s"] / row["pipeline_images_per_s"]
    row["compile_wall_s"] = time.perf_counter() - started
    _free(device)
    print(json.dumps(row), flush=True)


def _accelerator(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    compiled = any("compile_gain" in r for r in rows)
    head = ["arch", "size", "batch", "ceiling img/s", "pipeline img/s", "ratio",
            "static-batch loop img/s", "loader img/s"]
    if compiled:
        head += ["ceiling compiled", "pipeline compiled", "ratio compiled", "compile gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["arch"], str(r["size"]), str(r["batch"]), f"{r['ceiling_images_per_s']:.1f}",
                 f"{r['pipeline_images_per_s']:.1f}", f"{r['ratio']:.3f}",
                 f"{r['static_images_per_s']:.1f}", f"{r['loader_images_per_s']:.0f}"]
        if compiled:
            cells += ([f"{r['ceiling_compiled_images_per_s']:.1f}",
                       f"{r['pipeline_compiled_images_per_s']:.1f}",
                       f"{r['ratio_compiled']:.3f}", f"{r['compile_gain']:.3f}"]
                      if "compile_gain" in r else ["-"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="measured steps per figure")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=2000, help="synthetic JPEGs to cache")
    parser.add_argument("--size-override", type=int, default=None, help="one size for all archs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--compile-archs", nargs="+", default=None,
                        help="architectures to compile (default: all of --archs)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes drawing and caching the JPEGs (default: all cores)")
    parser.add_argument("--work", type=Path, default=None, help="folder for JPEGs and cache")
    args = parser.parse_args()

    # The anchor's settings, so that both columns run under the same backend flags.
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or "cpu")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {device_name}, "
          f"batch {args.batch}, steps {args.steps}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="skinsense-bench-"))
    sizes = {arch: args.size_override or ARCHS.get(arch, 224) for arch in args.archs}
    splits = {size: synthetic_split(work, args.images, size, args.workers)
              for size in sorted(set(sizes.values()))}
    header = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": device_name,
              "torch": torch.__version__, "torchvision": torchvision.__version__,
              "lightning": L.__version__, "python": sys.version.split()[0],
              "args": {k: str(v) for k, v in vars(args).items()}}
    rows: list[dict] = []

    def report() -> None:
        text = table(rows)
        print(text, flush=True)
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"])
            (out / "train_throughput.json").write_text(
                json.dumps(header | {"results": rows}, indent=1))
            (out / "train_throughput.md").write_text(text + "\n")

    for arch, size in sizes.items():
        rows.append(measure_eager(arch, size, args, splits[size]))
        report()
    print(f"target: pipeline / ceiling ratio >= {TARGET_RATIO} in eager mode", flush=True)
    if args.compile:
        for row in rows:
            if row["arch"] in (args.compile_archs or args.archs):
                measure_compiled(row, args, splits[row["size"]])
                report()


if __name__ == "__main__":
    main()
