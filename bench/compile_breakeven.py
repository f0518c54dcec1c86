"""When `train.compile` pays: compile time of the training step, compiled img/s, break-even.

For each architecture, in a process of its own (several may run at once: compiling is CPU
work), SkinSense's own training step (`train_throughput.Pipeline`, i.e. `setup_training` +
`train_one_epoch` through the real data path) is built twice, eager and with
`TrainConfig(compile=True)`:

  compile_s      - wall time of the first compiled steps minus the same number of steady
                   compiled steps (what torch.compile adds, once per training process)
  eager / compiled img/s - medians over --rounds alternated rounds, measured while holding an
                   exclusive lock (--lock), so that processes compiling at the same time never
                   measure the GPU together
  break_even_images = compile_s / (1/eager - 1/compiled): training images after which the
                   compiled run has caught up; in epochs of --epoch-images (HAM10000's
                   oversampled training part) too. No break-even when compiled is not faster.

  PYTHONPATH=. python3 bench/compile_breakeven.py --archs efficientnet_b0 [--epoch-images N]
Writes compile_<arch>.json into $OUT when set. `skinsense.training.compile_advice` holds the
figures this measured, and training warns when a compiled run is shorter than break-even.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ARCHS, Pipeline, synthetic_split  # noqa: E402


@contextlib.contextmanager
def exclusive(lock: Path | None):
    """Hold an exclusive flock on `lock` (if given) while measuring the GPU."""
    if lock is None:
        yield
        return
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(arch: str, args: argparse.Namespace) -> dict:
    size = args.size_override or ARCHS.get(arch, 224)
    split = synthetic_split(args.work, args.images, size, args.workers)
    accelerator = "cuda" if args.device == "cuda" else "cpu"
    row: dict = {"arch": arch, "size": size, "batch": args.batch,
                 "epoch_images": args.epoch_images}
    compiled = Pipeline(split, arch, batch=args.batch, accelerator=accelerator,
                        compile_model=True)
    started = time.perf_counter()
    compiled.train(args.first_steps)  # compiles forward and backward
    first = time.perf_counter() - started
    print(f"{arch}: first {args.first_steps} compiled steps took {first:.1f} s", flush=True)
    eager = Pipeline(split, arch, batch=args.batch, accelerator=accelerator,
                     compile_model=False)
    with exclusive(args.lock):
        eager.train(args.warmup)
        compiled.train(args.warmup)
        pairs = [(eager.train(args.round_steps), compiled.train(args.round_steps))
                 for _ in range(args.rounds)]
    row["eager_images_per_s"] = statistics.median(e for e, _ in pairs)
    row["compiled_images_per_s"] = statistics.median(c for _, c in pairs)
    row["compile_gain"] = statistics.median(c / e for e, c in pairs)
    steady = args.first_steps * args.batch / row["compiled_images_per_s"]
    row["compile_s"] = max(first - steady, 0.0)
    saving_per_image = 1 / row["eager_images_per_s"] - 1 / row["compiled_images_per_s"]
    if saving_per_image > 0:
        row["break_even_images"] = row["compile_s"] / saving_per_image
        row["break_even_epochs"] = row["break_even_images"] / args.epoch_images
    else:
        row["break_even_images"] = row["break_even_epochs"] = float("inf")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["efficientnet_b0"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-steps", type=int, default=30)
    parser.add_argument("--first-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=512)
    # The oversampled training part of the real HAM10000 split (bench/gpu_pipeline.py's
    # 'oversample' stage, train_rows) is about this size.
    parser.add_argument("--epoch-images", type=int, default=13_000)
    parser.add_argument("--size-override", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--lock", type=Path, default=None,
                        help="file to flock while measuring (shared by concurrent runs)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    args.work = args.work or Path(tempfile.mkdtemp(prefix="skinsense-compile-"))
    for arch in args.archs:
        try:
            row = measure(arch, args)
        except Exception as exc:  # report and go on with the next architecture
            row = {"arch": arch, "error": repr(exc)[:600]}
        print(json.dumps(row), flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"compile_{arch}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
