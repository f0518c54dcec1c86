"""Training throughput: SkinSense's own training step against the model-bound ceiling.

For each architecture, in one process on one device, both sides built once and then
measured in alternating rounds (ceiling, pipeline, ceiling, pipeline, ...); the figures are
medians over the rounds and the ratio is the median of the per-round ratios, so that drift of
a shared machine over minutes hits both sides alike:

  ceiling   - exactly `../shared/bench/gpu_anchor.py` mode `ceil`: torchvision model with a
              7-class head, bf16 autocast, channels_last, eager, AdamW(lr=1e-4), one static
              random batch already on the GPU (no data pipeline at all);
  pipeline  - the project's training step through its real data path: synthetic 600x450
              JPEGs (`skinsense.data.synth`) put through the image cache
              (`skinsense.data.cache`) at the arch's size, then `setup_training` and
              `train_one_epoch` of `skinsense.training.loop` (BatchedCacheLoader with pinned
              uint8 batches, TrainPreset augmentation on the GPU, Fabric bf16-mixed,
              channels_last, AdamW, gradient clipping as TrainConfig's defaults);
  static    - (once, after the rounds) the same loop fed one uint8 batch that already sits
              on the device (what the loop itself costs over the ceiling: augmentation,
              Fabric, clipping);
  loader    - (once) the data path alone: cache batches through `to_device_ahead`, the
              training loop's own copy to the device, images/s.

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
      --rounds 2 --warmup 1 --batch 4 --images 24 --size-override 32 --workers 1
Writes train_throughput.json and train_throughput.md into $OUT when it is set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
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
from skinsense.training.batches import BatchedCacheLoader, to_device_ahead
from skinsense.training.loop import setup_training, train_one_epoch

ARCHS = {"efficientnet_b0": 224, "efficientnet_b3": 300, "maxvit_t": 224}
TARGET_RATIO = 0.95


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_ceiling(arch: str, size: int, *, batch: int, device: torch.device,
                 compile_step: bool) -> Callable[[int], float]:
    """gpu_anchor.py's `ceil` (or `ceilc`): `run(steps)` gives images/s over that many steps."""
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

    compiled = torch.compile(step) if compile_step else step
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device=device)

    def run(steps: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            compiled(x, y)
        _sync(device)
        return steps * batch / (time.perf_counter() - start)

    return run


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


class Pipeline:
    """The project's own training step on one cached split, built once, measured many times."""

    def __init__(self, split: CachedSplit, arch: str, *, batch: int, accelerator: str,
                 compile_model: bool) -> None:
        self.cfg = TrainConfig(archs=[arch], image_size=split.size, batch_size=batch,
                               pretrained=False, epochs=1, lr=1e-4, accelerator=accelerator,
                               compile=compile_model, progress=False)
        self.fabric = L.Fabric(accelerator=accelerator, devices=1,
                               precision="bf16-mixed" if accelerator == "cuda" else "32-true")
        cache = ImageCache(size=split.size, key="bench", train=split, val=split, test=split)
        (self.model, self.optimizer, self.scheduler, self.loader, _, _,
         (self.preset, _)) = setup_training(cache, arch, self.cfg, self.fabric)
        self.epoch = 0

    def _epoch(self, batches) -> float:
        return train_one_epoch(self.fabric, self.model, batches, self.optimizer, self.scheduler,
                               self.preset, grad_clip_norm=self.cfg.grad_clip_norm,
                               grad_accum_steps=self.cfg.grad_accum_steps)["images_per_s"]

    def _steps(self, steps: int) -> _Steps:
        self.epoch += 1000  # a fresh order every call
        return _Steps(self.loader, steps, self.epoch)

    def train(self, steps: int) -> float:
        """Images/s of training fed through the real data path."""
        return self._epoch(self._steps(steps))

    def static(self, steps: int) -> float:
        """Images/s of the same loop on one uint8 batch already on the device."""
        on_device = self.fabric.to_device(next(iter(self.loader)))
        return self._epoch([on_device] * steps)

    def loader_only(self, steps: int) -> float:
        """Images/s of the data path alone: cache batch -> device, as `train_one_epoch` does."""
        start, seen = time.perf_counter(), 0
        for images, _labels in to_device_ahead(self._steps(steps), self.fabric.device):
            seen += len(images)
        _sync(self.fabric.device)
        return seen / (time.perf_counter() - start)


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


def interleaved(ceiling: Callable[[int], float], ours: Callable[[int], float],
                args: argparse.Namespace) -> tuple[float, float, float]:
    """Medians of (ceiling, ours, ours/ceiling) over rounds that alternate the two.

    On a shared machine throughput drifts by tens of percent over minutes; alternating short
    runs lets both sides see the same drift, and the ratio is taken within each round.
    """
    ceiling(args.warmup)
    ours(args.warmup)
    pairs = [(ceiling(_per_round(args)), ours(_per_round(args))) for _ in range(args.rounds)]
    ratios = [o / c for c, o in pairs]
    return (statistics.median(c for c, _ in pairs), statistics.median(o for _, o in pairs),
            statistics.median(ratios))


def measure(arch: str, size: int, args: argparse.Namespace, split: CachedSplit, *,
            compiled: bool) -> dict:
    """One architecture's figures, eager or compiled; a failure is reported as NaN."""
    device = torch.device(args.device)
    suffix = "_compiled" if compiled else ""
    started = time.perf_counter()
    row: dict = {f"ceiling{suffix}_images_per_s": math.nan,
                 f"pipeline{suffix}_images_per_s": math.nan, f"ratio{suffix}": math.nan}
    ceiling = ours = None
    try:
        ceiling = make_ceiling(arch, size, batch=args.batch, device=device,
                               compile_step=compiled)
        ours = Pipeline(split, arch, batch=args.batch, accelerator=_accelerator(device),
                        compile_model=compiled)
        (row[f"ceiling{suffix}_images_per_s"], row[f"pipeline{suffix}_images_per_s"],
         row[f"ratio{suffix}"]) = interleaved(ceiling, ours.train, args)
        if not compiled:
            row["static_images_per_s"] = ours.static(_per_round(args))
            row["loader_images_per_s"] = ours.loader_only(_per_round(args))
            if arch in (args.profile_archs or []):
                row |= profile(ours, args.profile_steps, arch)
    except Exception as exc:  # report and go on with the other measurements
        print(f"{arch}{suffix.replace('_', ' ')} failed: {exc!r}"[:600], flush=True)
    row[f"wall{suffix}_s"] = time.perf_counter() - started
    del ceiling, ours
    _free(device)
    return row


def profile(ours: Pipeline, steps: int, arch: str) -> dict:
    """Where the pipeline's time goes against the static-batch loop, under torch.profiler.

    For each side: wall time per step, the summed time of the GPU's kernels and copies per
    step, and the GPU's idle share (1 - busy / wall; copies on the side stream overlap
    compute, so this is a lower bound of the idle time). The top operators by CPU time go to
    $OUT/profile_<arch>.txt when $OUT is set.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if ours.fabric.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    row, tables = {}, []
    for side, run in (("pipeline", ours.train), ("static", ours.static)):
        run(3)
        with torch_profile(activities=activities) as prof:
            started = time.perf_counter()
            run(steps)
            wall = time.perf_counter() - started
        averages = prof.key_averages()
        # Kernels and copies are device-side events; two ways to add them up, since their
        # attributes moved between torch versions (the larger is kept).
        busy_us = max(
            sum(getattr(e, "self_device_time_total", 0.0) for e in averages
                if getattr(e, "device_type", None) == DeviceType.CUDA),
            sum(e.time_range.elapsed_us() for e in prof.events()
                if getattr(e, "device_type", None) == DeviceType.CUDA))
        row |= {f"{side}_ms_per_step": 1e3 * wall / steps,
                f"{side}_gpu_busy_ms_per_step": busy_us / 1e3 / steps,
                f"{side}_gpu_idle_share": 1 - busy_us / 1e6 / wall}
        tables.append(f"== {arch} {side}: {steps} steps, wall {wall:.3f} s\n"
                      + averages.table(sort_by="self_cpu_time_total", row_limit=25))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"profile_{arch}.txt").write_text("\n\n".join(tables))
    return row


def _per_round(args: argparse.Namespace) -> int:
    return args.steps // args.rounds


def _accelerator(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    compiled = any("compile_gain" in r for r in rows)
    head = ["arch", "size", "batch", "ceiling img/s", "pipeline img/s", "median ratio",
            "static-batch loop img/s", "loader img/s"]
    if compiled:
        head += ["ceiling compiled", "pipeline compiled", "ratio compiled", "compile gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["arch"], str(r["size"]), str(r["batch"]), f"{r['ceiling_images_per_s']:.1f}",
                 f"{r['pipeline_images_per_s']:.1f}", f"{r['ratio']:.3f}",
                 f"{r.get('static_images_per_s', math.nan):.1f}",
                 f"{r.get('loader_images_per_s', math.nan):.0f}"]
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
    parser.add_argument("--steps", type=int, default=200,
                        help="measured steps per figure, split over --rounds")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternations of ceiling and pipeline (medians are reported)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=1024, help="synthetic JPEGs to cache")
    parser.add_argument("--size-override", type=int, default=None, help="one size for all archs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--compile-archs", nargs="+", default=None,
                        help="architectures to compile (default: all of --archs)")
    parser.add_argument("--profile-archs", nargs="*", default=None,
                        help="also profile the pipeline against the static-batch loop")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes drawing and caching the JPEGs (default: all cores)")
    parser.add_argument("--work", type=Path, default=None, help="folder for JPEGs and cache")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < args.rounds or args.warmup < 1 or args.batch < 1:
        parser.error(f"need --rounds >= 1, --steps >= --rounds, --warmup >= 1 and --batch >= 1 "
                     f"(got rounds {args.rounds}, steps {args.steps}, warmup {args.warmup}, "
                     f"batch {args.batch})")

    # The anchor's settings for the ceiling. The pipeline sets the same ones itself
    # (`configure_backends` in `setup_training`, as `fit` does), so its column is what a
    # real training runs with.
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
        row = {"arch": arch, "size": size, "batch": args.batch, "steps": args.steps,
               "rounds": args.rounds}
        rows.append(row | measure(arch, size, args, splits[size], compiled=False))
        print(json.dumps(rows[-1]), flush=True)
        report()
    print(f"target: pipeline / ceiling ratio >= {TARGET_RATIO} in eager mode", flush=True)
    if args.compile:
        for row in rows:
            if row["arch"] in (args.compile_archs or args.archs):
                row |= measure(row["arch"], row["size"], args, splits[row["size"]],
                               compiled=True)
                row["compile_gain"] = (row["pipeline_compiled_images_per_s"]
                                       / row["pipeline_images_per_s"])
                print(json.dumps(row), flush=True)
                report()


if __name__ == "__main__":
    main()
