"""Run `fit` in a child process (torchrun for several GPUs) and hand back its result.

Training in a child keeps the calling process (a Prefect flow, the CLI) out of harm's way: its
GPU memory is all freed when the child exits, between architectures; a crash, even a CUDA or
out-of-memory abort, ends the child and not the flow; and DDP can start one process per GPU
without re-executing the caller's script (what `fabric.launch()` would do in it). On CUDA
the child is given `devices` GPUs that no other training on this machine holds
(`skinsense.training.gpus`), so trainings that run side by side do not share GPU 0.

The child is `python -m skinsense.training.worker SPEC` (see `worker.py`), or torchrun of the
same module with `devices > 1`. Its output is copied to this process's stdout line by
line, so Prefect's log capture and a terminal see the epochs as they end.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from skinsense.config import TrainConfig
from skinsense.data.records import ImageCache
from skinsense.training.gpus import DEFAULT_LOCK_DIR, reserve_gpus, visible_gpus
from skinsense.training.loop import TrainResult

SPEC_FILE = "train_spec.json"
RESULT_FILE = "result.json"
_TAIL_LINES = 40


class TrainingFailed(RuntimeError):
    """The training child exited with an error; the message ends with its last output.

    `diverged` is True when the loss became non-finite (the loop's FloatingPointError): a
    rerun with the same settings and seed diverges again, so retrying it is pointless.
    """

    def __init__(self, message: str, *, returncode: int, output_tail: str,
                 diverged: bool = False) -> None:
        super().__init__(message)
        self.returncode, self.output_tail, self.diverged = returncode, output_tail, diverged


def check_devices(cfg: TrainConfig) -> None:
    """Refuse a `devices > 1` this machine cannot give, before any process is started.

    Several CUDA GPUs run one DDP process each (NCCL). `accelerator='cpu'` with `devices > 1`
    runs that many DDP processes on the CPU (gloo): the same code path, used to test DDP on
    machines without GPUs.
    """
    if cfg.devices == 1:
        return
    if cfg.accelerator == "cpu":
        return
    if not cfg.may_use_cuda:
        raise ValueError(f"devices={cfg.devices} is not supported with accelerator="
                         f"'{cfg.accelerator}'; use CUDA GPUs, or devices=1")
    available = len(visible_gpus())
    if available < cfg.devices:
        raise ValueError(
            f"devices={cfg.devices} needs {cfg.devices} CUDA GPUs, but this machine has "
            f"{available}; set devices to at most {max(available, 1)} (or accelerator='cpu' "
            f"to run {cfg.devices} DDP processes on the CPU)")


def worker_command(spec_path: Path, cfg: TrainConfig) -> list[str]:
    """The child's command line: torchrun with one process per device when `devices > 1`."""
    module = ["-m", "skinsense.training.worker", str(spec_path)]
    if cfg.devices > 1:
        check_devices(cfg)
        # --standalone: a private rendezvous on a free port, so runs on one host never clash.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={cfg.devices}", *module]
    return [sys.executable, *module]


def train_in_subprocess(
    cache: ImageCache,
    arch: str,
    cfg: TrainConfig,
    *,
    out_dir: Path,
    class_weights: list[float] | None = None,
    card_extra: dict | None = None,
    mlflow_run_id: str | None = None,
    env: dict[str, str] | None = None,
    gpu_lock_dir: Path = DEFAULT_LOCK_DIR,
) -> TrainResult:
    """Train `arch` like `fit`, in a child process; returns the child's `TrainResult`.

    Args:
        cache: The cached train/val parts at this architecture's size.
        arch: torchvision architecture name.
        cfg: Training settings (`devices > 1` starts torchrun with DDP).
        out_dir: Checkpoints, the model folder, the spec and the result go here; a run
            that finds a checkpoint there resumes from it.
        class_weights: Loss weights in CLASS_CODES order, or None.
        card_extra: Fields for the model card (JSON-serializable).
        mlflow_run_id: When given, the child logs each epoch's metrics to this MLflow run
            (set MLFLOW_TRACKING_URI in `env` when the store is not the default).
        env: Extra environment variables for the child.
        gpu_lock_dir: Where the per-GPU lock files are (see `skinsense.training.gpus`): on
            CUDA the child gets `cfg.devices` GPUs no other training holds, waiting for
            them if need be, and sees only those.

    Raises:
        TrainingFailed: The child exited with a non-zero status (or was killed).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = out_dir / SPEC_FILE, out_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)  # a result left by an earlier run must not be read
    spec = {"cache": cache.model_dump(mode="json"), "arch": arch,
            "cfg": cfg.model_dump(mode="json"), "out_dir": str(out_dir),
            "class_weights": class_weights, "card_extra": card_extra,
            "mlflow_run_id": mlflow_run_id, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec, indent=1))
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    command = worker_command(spec_path, cfg)
    gpus = visible_gpus() if cfg.may_use_cuda else []
    with (reserve_gpus(cfg.devices, gpus, lock_dir=gpu_lock_dir, on_wait=_say) if gpus
          else contextlib.nullcontext()) as held:
        if held:
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(held)
        returncode, tail = _run_streaming(command, child_env)
    if returncode != 0:
        # The last line of a Python crash is the exception itself: lead with it.
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        raise TrainingFailed(
            f"training {arch} failed in its child process (exit status {returncode}): "
            f"{last}\n--- its last output ---\n{tail}", returncode=returncode, output_tail=tail,
            diverged=last.startswith("FloatingPointError"))
    if not result_path.exists():
        raise TrainingFailed(f"training {arch} ended without writing {result_path}; its last "
                             f"output:\n{tail}", returncode=returncode, output_tail=tail)
    return TrainResult.model_validate_json(result_path.read_text())


def _say(message: str) -> None:
    print(message, flush=True)


def _run_streaming(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `command`, copying its stdout and stderr to ours line by line; (status, tail)."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
        return process.wait(), "".join(tail)
    finally:
        # Cancelled or interrupted here (Ctrl-C, a Prefect cancellation): the child must not
        # outlive us holding the GPU.
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
