"""The whole HAM10000-sized job on one GPU, stage by stage: how long each stage takes.

Data: one synthetic 600x450 JPEG for every row of the real HAM10000 metadata (10,015 images,
its lesion ids and classes, so the split, the oversampling and the training part have the real
sizes), written like the Dataverse files and read back through the folder source.

Stages, through the same library functions the Prefect tasks call (`skinsense.stages` and
what it calls; no Prefect or MLflow server is needed, so it runs on the GPU machine):
fetch (folder) -> validate -> split -> oversample -> cache at 224 and 300 px -> train
efficientnet_b0, efficientnet_b3 and maxvit_t (TrainConfig defaults: 10 epochs, early
stopping, bf16-mixed, batch 64; random weights, since no pretrained weights can be fetched
there) -> evaluate (temperature, referral threshold and gate on validation; metrics,
calibration, referral with lesion-bootstrap intervals, subgroup audit and the gate against the
reference photos on test).

Training runs twice: `sequential` (one architecture after another, as the pipeline does by
default) and `parallel` (all three at once on the one GPU, as `train.parallel_archs` would
if the GPU lock let them share it). Each training is a child process (the launcher's), whose
epoch lines are timestamped here; with `--epochs` below the default the figure for the full
10 epochs is projected from the measured steady epoch (marked as a projection).

  PYTHONPATH=. python3 bench/gpu_pipeline.py --metadata tests/fixtures/HAM10000_metadata.csv

After each cache stage, one pass of the training loader over the fresh cache is timed twice
(cold: the file's first read; warm: as a second epoch reads it), without the GPU.

CPU smoke test (tests/test_gpu_benches.py): `--images 140 --archs resnet18
--size-override 32 --epochs 1 --modes sequential --device cpu`.
Writes gpu_pipeline.json and gpu_pipeline.md into $OUT when it is set (rewritten after every
stage, so a run cut short keeps what it measured). `--marker PATH` touches PATH once the data
stages are done (a driver script can start other GPU work only then).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import io
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

from skinsense.config import DataConfig, EvalConfig, PipelineConfig, TrainConfig
from skinsense.data.synth import make_synthetic_ham10000
from skinsense.paths import Home

ARCH_SIZES = {"efficientnet_b0": 224, "efficientnet_b3": 300, "maxvit_t": 224}
DEFAULT_EPOCHS = TrainConfig.model_fields["epochs"].default
_EPOCH_LINE = re.compile(r"^(?P<arch>\S+) epoch (?P<epoch>\d+)/(?P<epochs>\d+):")


class EpochClock(io.TextIOBase):
    """stdout that also notes when each training child's 'ARCH epoch k/E:' line arrives."""

    def __init__(self, inner) -> None:
        self.inner, self.lock = inner, threading.Lock()
        self.epochs: dict[str, list[tuple[int, float]]] = {}
        self._partial = ""

    def write(self, text: str) -> int:
        now = time.perf_counter()
        with self.lock:
            self.inner.write(text)
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                if match := _EPOCH_LINE.match(line):
                    self.epochs.setdefault(match["arch"], []).append((int(match["epoch"]), now))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()


class Report:
    """Stage timings, rewritten to $OUT after every stage."""

    def __init__(self, header: dict) -> None:
        self.header, self.stages, self.training = header, [], {}
        self.evaluation: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str, **extra):
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        yield extra
        self.stages.append({"stage": name, "seconds": round(time.perf_counter() - started, 2),
                            **extra})
        print(f"   {name}: {self.stages[-1]['seconds']:.1f} s", flush=True)
        self.write()

    def markdown(self) -> str:
        lines = ["| stage | seconds | notes |", "| --- | ---: | --- |"]
        for s in self.stages:
            notes = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("stage", "seconds"))
            lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {notes} |")
        if self.training:
            lines += ["", "| mode | arch | epochs run | wall s | first epoch s | steady epoch s "
                      f"| projected {DEFAULT_EPOCHS}-epoch wall s | train img/s (last epoch) |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for mode, rows in self.training.items():
                for arch, r in rows.items():
                    lines.append(
                        f"| {mode} | {arch} | {r['epochs_run']} | {r['wall_s']:.1f} | "
                        f"{r['first_epoch_s']:.1f} | {r['steady_epoch_s']:.1f} | "
                        f"{r['projected_wall_s']:.1f} | {r['images_per_s']:.0f} |")
        if self.evaluation:
            lines += ["", "| arch | eval s | test balanced acc | ECE | gate AUROC |",
                      "| --- | ---: | ---: | ---: | ---: |"]
            for arch, r in self.evaluation.items():
                lines.append(f"| {arch} | {r['seconds']:.1f} | {r['balanced_accuracy']:.3f} | "
                             f"{r['ece']:.3f} | {r['ood_auroc']:.3f} |")
        return "\n".join(lines)

    def write(self) -> None:
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"])
            (out / "gpu_pipeline.json").write_text(json.dumps(
                self.header | {"stages": self.stages, "training": self.training,
                               "evaluation": self.evaluation}, indent=1, default=str))
            (out / "gpu_pipeline.md").write_text(self.markdown() + "\n")


def make_data(work: Path, metadata: Path | None, n_images: int, workers: int | None) -> Path:
    """Synthetic JPEGs for the real metadata's rows (or `n_images` drawn rows)."""
    frame = pd.read_csv(metadata) if metadata else None
    if frame is not None and n_images < len(frame):
        # A smaller job keeps whole lesions, so the lesion-level split stays meaningful.
        per_lesion = frame.groupby("lesion_id").size().sample(frac=1, random_state=0)
        keep = per_lesion.index[per_lesion.cumsum().to_numpy() <= n_images]
        frame = frame[frame["lesion_id"].isin(keep)]
    return make_synthetic_ham10000(work / "source", n_images=n_images, metadata=frame, seed=0,
                                   workers=workers)


def loader_passes(cache, *, pin_memory: bool) -> dict[str, float]:
    """Seconds of two passes of the training loader over a freshly written cache (no GPU):
    the first reads the file cold, the second as the second epoch would."""
    from skinsense.training.batches import BatchedCacheLoader

    loader = BatchedCacheLoader(cache.train, batch_size=64, shuffle=True, pin_memory=pin_memory)
    times = {}
    for name in ("cold", "warm"):
        started = time.perf_counter()
        for _ in loader:
            pass
        times[f"loader_{name}_s"] = time.perf_counter() - started
    return times


def train_all(caches: dict, sizes: dict[str, int], cfg: PipelineConfig, home: Home,
              class_weights, *, mode: str, clock: EpochClock, lock_root: Path) -> dict[str, dict]:
    """Train every architecture (one after another, or all at once) and time each."""
    from skinsense.training.launcher import train_in_subprocess

    def one(arch: str) -> tuple[str, dict]:
        # A lock folder of its own per training in parallel mode: the launcher's GPU lock
        # would otherwise run them one at a time on a one-GPU machine.
        lock_dir = lock_root / (arch if mode == "parallel" else "shared")
        started = time.perf_counter()
        result = train_in_subprocess(
            caches[sizes[arch]], arch, cfg.train.model_copy(update={"archs": [arch]}),
            out_dir=home.runs / f"{mode}-{arch}", class_weights=class_weights,
            card_extra={"config": cfg.model_dump(mode="json")}, gpu_lock_dir=lock_dir)
        ended = time.perf_counter()
        return arch, _timing(result, started, ended, clock.epochs.get(arch, []))

    if mode == "parallel":
        with concurrent.futures.ThreadPoolExecutor(len(sizes)) as pool:
            rows = dict(pool.map(one, sizes))
    else:
        rows = dict(one(arch) for arch in sizes)
    for arch in sizes:
        clock.epochs.pop(arch, None)
    return rows


def _timing(result, started: float, ended: float, epochs: list[tuple[int, float]]) -> dict:
    """Wall time, the first and the steady epoch, and the projection to the default epochs."""
    ends = [t for _, t in sorted(epochs)]
    first = (ends[0] - started) if ends else ended - started
    steady = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else first
    tail = (ended - ends[-1]) if ends else 0.0
    remaining = max(DEFAULT_EPOCHS - len(ends), 0)
    return {"epochs_run": result.epochs_run, "wall_s": ended - started, "first_epoch_s": first,
            "steady_epoch_s": steady, "tail_s": tail,
            "projected_wall_s": (ended - started) + remaining * steady,
            "images_per_s": result.history[-1].get("images_per_s", float("nan"))
            if result.history else float("nan"),
            "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
            "model_dir": str(result.model_dir)}


def evaluate_all(trained: dict[str, dict], caches: dict, sizes: dict[str, int],
                 cfg: EvalConfig, report: Report) -> None:
    """What the evaluate task does for each model: fit on validation, measure on test, one
    way (`skinsense.evaluation.architecture`: the weights read once, each part through the
    network once, the card written once), without the size and speed figures."""
    from skinsense.evaluation.architecture import evaluate_architecture

    cfg = cfg.model_copy(update={"measure_efficiency": False})
    for arch, row in trained.items():
        model_dir, cache = Path(row["model_dir"]), caches[sizes[arch]]
        started = time.perf_counter()
        evaluation = evaluate_architecture(model_dir, cache, cfg)
        evaluation.write()
        result = evaluation.test
        m = result.metrics
        report.evaluation[arch] = {
            "seconds": time.perf_counter() - started,
            "balanced_accuracy": m.get("balanced_accuracy", float("nan")),
            "ece": m.get("ece", float("nan")),
            "ood_auroc": (result.ood or {}).get("ood_auroc", float("nan"))}
        report.write()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metadata", type=Path, default=None,
                        help="a HAM10000_metadata.csv whose rows the synthetic images follow "
                        "(default: drawn metadata)")
    parser.add_argument("--images", type=int, default=10015)
    parser.add_argument("--archs", nargs="+", default=list(ARCH_SIZES))
    parser.add_argument("--size-override", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--modes", nargs="+", default=["sequential", "parallel"],
                        choices=["sequential", "parallel"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: what is there)")
    parser.add_argument("--workers", type=int, default=None, help="processes for data stages")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--marker", type=Path, default=None,
                        help="file to touch once the data stages are done")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="skinsense-gpu-pipeline-"))
    home = Home(work / "home")
    cfg = PipelineConfig(
        data=DataConfig(source=str(work / "source"), cache_workers=args.workers),
        train=TrainConfig(archs=args.archs, epochs=args.epochs, pretrained=False,
                          image_size=args.size_override, progress=False,
                          accelerator="cuda" if device == "cuda" else "cpu"),
        eval=EvalConfig())
    report = Report({"date": dt.datetime.now().isoformat(timespec="seconds"),
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "python": sys.version.split()[0],
                     "cpus": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()}})
    from skinsense import stages

    total = time.perf_counter()
    with report.stage("synthetic JPEGs (not a pipeline stage)", images=args.images):
        make_data(work, args.metadata, args.images, args.workers)
    with report.stage("fetch (folder source)"):
        fetched = stages.fetch_data(cfg.data, home, progress=False)
    with report.stage("validate") as note:
        validated = stages.validate_data(fetched, cfg.data, home)
        note["images"] = validated.n_images
    with report.stage("split"):
        split = stages.split_data(validated, cfg.data, home)
    with report.stage("oversample") as note:
        oversampled = stages.oversample_data(split, cfg.data, home)
        note["train_rows"] = len(pd.read_csv(oversampled.train_csv))
    sizes = stages.image_sizes(cfg)
    caches = {}
    for size in sorted(set(sizes.values())):
        with report.stage(f"cache {size} px"):
            caches[size] = stages.cache_images(split, oversampled, size, cfg.data, home,
                                               validated=validated)
        # Not a stage: does a first epoch wait for the file's first read?
        report.stages[-1] |= loader_passes(caches[size], pin_memory=device == "cuda")
    data_s = time.perf_counter() - total
    if args.marker:
        args.marker.touch()
    clock = EpochClock(sys.stdout)
    evaluate_s = float("nan")
    for mode in args.modes:
        with report.stage(f"train ({mode})", archs=" ".join(args.archs), epochs=args.epochs):
            with contextlib.redirect_stdout(clock):
                report.training[mode] = train_all(
                    caches, sizes, cfg, home, oversampled.class_weights, mode=mode, clock=clock,
                    lock_root=work / "gpu-locks")
        if mode == args.modes[0]:
            # Right after the first training, so that a run cut short still has it.
            with report.stage("evaluate", models=mode):
                evaluate_all(report.training[mode], caches, sizes, cfg.eval, report)
            evaluate_s = report.stages[-1]["seconds"]
    measured = time.perf_counter() - total
    for mode, rows in report.training.items():
        train_s = next(s["seconds"] for s in report.stages if s["stage"] == f"train ({mode})")
        if mode == "sequential":
            projected = sum(r["projected_wall_s"] for r in rows.values())
        else:
            projected = max(r["projected_wall_s"] for r in rows.values())
        report.header[f"whole_job_{mode}"] = {
            "data_s": round(data_s, 1), "train_s": round(train_s, 1),
            "evaluate_s": round(evaluate_s, 1),
            "total_s": round(data_s + train_s + evaluate_s, 1),
            f"projected_total_{DEFAULT_EPOCHS}_epochs_s": round(data_s + projected + evaluate_s, 1)}
    report.header["measured_wall_s"] = round(measured, 1)
    report.write()
    print(report.markdown())
    print(json.dumps({k: v for k, v in report.header.items() if k.startswith("whole_job")},
                     indent=1))


if __name__ == "__main__":
    main()
