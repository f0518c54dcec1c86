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

With `num_nodes > 1` the torchrun agent started here is one of several: every node runs the
same command (c10d rendezvous at `rdzv_endpoint`, the run folder's name as rendezvous id),
the others through `skinsense train-node SPEC` (`join_training`), which reads the spec this
node wrote into the shared run folder. torchrun ranks the nodes itself, so global rank 0,
which writes checkpoints, the model folder and the result, may be on any of them: the run
folder must be on storage every node mounts at the same path (a shared SKINSENSE_HOME).
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
    """The child's command line: torchrun with one process per device when `devices > 1`,
    and the same multi-node torchrun command on every node when `num_nodes > 1`."""
    module = ["-m", "skinsense.training.worker", str(spec_path)]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if cfg.num_nodes > 1:
        check_devices(cfg)
        return [*torchrun, *rendezvous_args(cfg, run_id=Path(spec_path).parent.name), *module]
    if cfg.devices > 1:
        check_devices(cfg)
        # --standalone: a private rendezvous on a free port, so runs on one host never clash.
        return [*torchrun, "--standalone", f"--nproc_per_node={cfg.devices}", *module]
    return [sys.executable, *module]


def rendezvous_args(cfg: TrainConfig, *, run_id: str) -> list[str]:
    """torchrun's arguments for `cfg.num_nodes` nodes meeting at `cfg.rdzv_endpoint`.

    The c10d backend needs no etcd: the agent on the endpoint's host serves the rendezvous
    store. `run_id` (the run folder's name) is the same on every node and differs between
    trainings, so two multi-node trainings through one endpoint never join each other.
    A failed rank is not restarted: a retry of the train task resumes from the checkpoint.
    """
    return [f"--nnodes={cfg.num_nodes}", f"--nproc-per-node={cfg.devices}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
            f"--rdzv-id={run_id}", f"--rdzv-conf=join_timeout={cfg.rdzv_timeout_s}",
            "--max-restarts=0"]


def join_command(spec_path: Path) -> str:
    """What to run on each other node of a multi-node training."""
    return f"skinsense train-node {spec_path}"


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
            "mlflow_run_id": mlflow_run_id, "result": str(result_path),
            # Rank 0 may run on another node (multi-node): it needs the same MLflow store.
            "env": env or {}}
    # The other nodes of a multi-node training read it too: written whole or not at all.
    tmp = spec_path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, spec_path)
    command = worker_command(spec_path, cfg)
    if cfg.num_nodes > 1:
        _say(f"multi-node training of {arch}: this machine is one of {cfg.num_nodes} nodes "
             f"meeting at {cfg.rdzv_endpoint} (waiting up to {cfg.rdzv_timeout_s} s); start "
             f"each of the other {cfg.num_nodes - 1} with:\n  {join_command(spec_path)}")
    returncode, tail = _run_on_this_node(command, cfg, env or {}, gpu_lock_dir)
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


def join_training(spec_path: Path, *, gpu_lock_dir: Path = DEFAULT_LOCK_DIR) -> None:
    """Run this node's part of a multi-node training that another node started.

    Starts the same torchrun agent as the node that wrote `spec_path` (see `worker_command`)
    and returns when the training ends on every node.

    Args:
        spec_path: The run folder's `train_spec.json`, on the shared SKINSENSE_HOME.
        gpu_lock_dir: Per-GPU lock files of this machine (see `skinsense.training.gpus`).

    Raises:
        FileNotFoundError: The spec or the image cache is not where the spec says: the
            shared storage is not mounted here, or not at the same path.
        ValueError: The spec is not a multi-node training.
        TrainingFailed: This node's agent exited with an error.
    """
    spec_path = Path(spec_path).resolve()
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"no training spec at {spec_path}: pass the path printed by the node that started "
            f"the training, with the shared SKINSENSE_HOME mounted at the same path here")
    spec = json.loads(spec_path.read_text())
    cfg = TrainConfig.model_validate(spec["cfg"])
    if cfg.num_nodes < 2:
        raise ValueError(f"{spec_path} is a training on one node (num_nodes=1); there is "
                         f"nothing to join")
    cache = ImageCache.model_validate(spec["cache"])
    missing = [str(p) for p in (cache.train.images_npy, cache.train.labels_npy,
                                cache.val.images_npy, cache.val.labels_npy) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"the image cache of this training is not on this machine ({', '.join(missing)}): "
            f"mount the shared SKINSENSE_HOME at the same path on every node")
    _say(f"joining the multi-node training of {spec['arch']} at {cfg.rdzv_endpoint} as one of "
         f"{cfg.num_nodes} nodes")
    returncode, tail = _run_on_this_node(worker_command(spec_path, cfg), cfg,
                                         spec.get("env") or {}, gpu_lock_dir)
    if returncode != 0:
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        raise TrainingFailed(
            f"this node's part of training {spec['arch']} failed (exit status {returncode}): "
            f"{last}\n--- its last output ---\n{tail}", returncode=returncode,
            output_tail=tail)


def _run_on_this_node(command: list[str], cfg: TrainConfig, env: dict[str, str],
                      gpu_lock_dir: Path) -> tuple[int, str]:
    """Run a training command on GPUs of this machine no other training holds."""
    child_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    gpus = visible_gpus() if cfg.may_use_cuda else []
    with (reserve_gpus(cfg.devices, gpus, lock_dir=gpu_lock_dir, on_wait=_say) if gpus
          else contextlib.nullcontext()) as held:
        if held:
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(held)
        return _run_streaming(command, child_env)


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
