"""One ceiling: why the anchor's model-bound ceiling and the training bench's differ.

`../shared/bench/gpu_anchor.py ceil` measures the ceiling alone in its own process, for
SECS seconds at a stretch. `bench/train_throughput.py` measures the same step in short rounds
(steps / rounds at a time) alternated with SkinSense's pipeline, in a process that also holds
the pipeline's model, optimizer, image cache and loader thread. For each architecture, in a
fresh process of its own, this measures the same ceiling step (`train_throughput.make_ceiling`)
under each of those conditions in turn:

  alone        - nothing else built yet, timed for --secs at a stretch (the anchor's way)
  short rounds - the bench's way: --rounds rounds of --round-steps steps, median
  resident     - after the pipeline (a second model, its optimizer, the cache) is built and
                 has trained a few steps, still timed for --secs
  loader busy  - while a thread reads cache batches into pinned memory, as the training's
                 loader does, timed for --secs
  alone again  - the first measurement repeated last (drift over the minute it took)

Every measurement notes its start and end (time.time()) so that clocks and power sampled by
`nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw ... -lms 250` in the same call can be
matched to it (`bench/gpu_session.sh` does that and prints the medians per phase).

  PYTHONPATH=.:bench python3 bench/ceiling_check.py [--archs ...] [--secs 4]
Writes ceiling_check.json into $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ARCHS, Pipeline, make_ceiling, synthetic_split  # noqa: E402


def timed(run, *, secs: float, batch: int) -> float:
    """Images/s of `run(steps)` over about `secs` seconds (steps sized from a short probe)."""
    probe = run(4)
    steps = max(8, int(secs * probe / batch))
    return run(steps)


def measure_arch(arch: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    size = args.size_override or ARCHS.get(arch, 224)
    rows: list[dict] = []

    def note(condition: str, fn) -> None:
        started = time.time()
        ips = fn()
        rows.append({"arch": arch, "condition": condition, "images_per_s": ips,
                     "t0": started, "t1": time.time()})
        print(f"{arch:16s} {condition:12s} {ips:8.1f} img/s", flush=True)

    ceiling = make_ceiling(arch, size, batch=args.batch, device=device, compile_step=False)
    ceiling(args.warmup)
    note("alone", lambda: timed(ceiling, secs=args.secs, batch=args.batch))
    note("short rounds", lambda: statistics.median(
        ceiling(args.round_steps) for _ in range(args.rounds)))
    split = synthetic_split(args.work, args.images, size, None)
    pipeline = Pipeline(split, arch, batch=args.batch, accelerator=device.type,
                        compile_model=False)
    pipeline.train(args.warmup)
    note("resident", lambda: timed(ceiling, secs=args.secs, batch=args.batch))
    stop = threading.Event()

    def read_batches() -> None:
        # The loader's own thread: pinned uint8 batches read from the memory-mapped cache.
        while not stop.is_set():
            for _ in pipeline.loader:
                if stop.is_set():
                    return

    reader = threading.Thread(target=read_batches, daemon=True)
    reader.start()
    try:
        note("loader busy", lambda: timed(ceiling, secs=args.secs, batch=args.batch))
    finally:
        stop.set()
        reader.join()
    del pipeline
    torch.cuda.empty_cache() if device.type == "cuda" else None
    note("alone again", lambda: timed(ceiling, secs=args.secs, batch=args.batch))
    return {"arch": arch, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--secs", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-steps", type=int, default=8,
                        help="steps per short round (the throughput bench's 40 steps / 5)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size-override", type=int, default=None, help="one size for all archs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one arch here
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.one:
        print(json.dumps(measure_arch(args.one, args)), flush=True)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="skinsense-ceiling-"))
    results = []
    for arch in args.archs:
        # A fresh process per architecture, like the anchor's start.
        command = [sys.executable, __file__, "--one", arch, "--work", str(work),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("archs", "one", "work") and v is not None]]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        sys.stdout.write(done.stdout[:-1] if done.stdout.endswith("\n") else done.stdout)
        print(flush=True)
        if done.returncode != 0:
            print(f"{arch} failed:\n{done.stderr[-2000:]}", flush=True)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "ceiling_check.json").write_text(json.dumps(results, indent=1))
    for r in results:
        by = {row["condition"]: row["images_per_s"] for row in r["rows"]}
        print(f"| {r['arch']} | " + " | ".join(f"{by.get(c, float('nan')):.1f}" for c in
              ("alone", "short rounds", "resident", "loader busy", "alone again")) + " |")


if __name__ == "__main__":
    main()
