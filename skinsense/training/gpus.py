"""Which GPUs of this machine a training child may use.

Trainings that run at the same time (`train.parallel_archs`, or two flow runs on one worker)
must not all land on GPU 0. Prefect's global concurrency limit 'gpu' counts how many GPUs
are busy, but not which ones; `reserve_gpus` picks them. Each GPU has a lock file, and a
training holds an exclusive `flock` on the lock files of its GPUs while its child runs. The
child sees only those GPUs (CUDA_VISIBLE_DEVICES). The operating system drops a lock when
its holder exits, so a crashed or killed flow process never leaves a GPU reserved.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import torch

DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "skinsense-gpu-locks"


def visible_gpus() -> list[str]:
    """The ids of the CUDA GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:
        # Already restricted (a container, a scheduler, the user): keep within that set.
        return [g.strip() for g in inherited.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def _lock_dir(lock_dir: Path) -> Path:
    if not lock_dir.is_dir():
        lock_dir.mkdir(parents=True, exist_ok=True)
        # Shared like /tmp: every user's trainings on this machine use the same GPUs.
        with suppress(OSError):
            os.chmod(lock_dir, 0o1777)
    return lock_dir


def _try_lock(path: Path) -> int | None:
    # Read-only is enough for flock, and works on a lock file another user created.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def reserve_gpus(count: int, gpus: list[str], *, lock_dir: Path = DEFAULT_LOCK_DIR,
                 poll_s: float = 2.0, timeout_s: float | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """Hold `count` of `gpus` for as long as the `with` block runs; yields the ids held.

    Waits (polling every `poll_s`) while fewer than `count` are free, and tells `on_wait`
    once that it does.

    Raises:
        ValueError: `count` is larger than `len(gpus)`: the wait could never end.
        TimeoutError: `timeout_s` passed without `count` GPUs coming free.
    """
    if count > len(gpus):
        raise ValueError(f"{count} GPU(s) wanted, but only {len(gpus)} are visible: {gpus}")
    lock_dir = _lock_dir(lock_dir)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    told = False
    while True:
        with ExitStack() as held:
            ids: list[str] = []
            for gpu in gpus:
                fd = _try_lock(lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock")
                if fd is None:
                    continue
                held.callback(os.close, fd)  # closing the file drops its lock
                ids.append(gpu)
                if len(ids) == count:
                    yield ids
                    return
        # Too few were free: all partial locks were dropped above, so two waiting
        # trainings never each hold half of what the other needs.
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no {count} free GPU(s) among {gpus} after {timeout_s} s")
        if not told and on_wait is not None:
            on_wait(f"waiting for {count} free GPU(s): the others of {gpus} are held by "
                    f"other trainings (locks in {lock_dir})")
            told = True
        time.sleep(poll_s)
