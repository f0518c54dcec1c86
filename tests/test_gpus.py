"""GPU reservations: trainings at the same time get different GPUs (runs on the CPU)."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
import time

import pytest

from skinsense.training.gpus import reserve_gpus

GPUS = ["0", "1"]


def test_reservations_take_different_gpus_and_give_them_back(tmp_path):
    with reserve_gpus(1, GPUS, lock_dir=tmp_path) as first:
        with reserve_gpus(1, GPUS, lock_dir=tmp_path) as second:
            assert sorted(first + second) == GPUS
            with pytest.raises(TimeoutError, match="no 1 free GPU"):
                with reserve_gpus(1, GPUS, lock_dir=tmp_path, poll_s=0.05, timeout_s=0.2):
                    pass
    with reserve_gpus(2, GPUS, lock_dir=tmp_path, timeout_s=0) as both:
        assert both == GPUS


def test_the_lock_folder_it_creates_is_shared_by_all_users_like_tmp(tmp_path):
    with reserve_gpus(1, GPUS, lock_dir=tmp_path / "locks"):
        pass
    assert stat.S_IMODE((tmp_path / "locks").stat().st_mode) == 0o1777


def test_a_waiting_reservation_says_so_and_gets_the_gpu_when_it_is_freed(tmp_path):
    said: list[str] = []
    got: list[list[str]] = []
    with reserve_gpus(1, ["0"], lock_dir=tmp_path):
        waiter = threading.Thread(target=lambda: got.append(_hold_briefly(tmp_path, said)))
        waiter.start()
        time.sleep(0.5)
        assert not got and said and "waiting for 1 free GPU" in said[0]
    waiter.join(timeout=10)
    assert got == [["0"]] and len(said) == 1  # told once, not at every poll


def _hold_briefly(lock_dir, said) -> list[str]:
    with reserve_gpus(1, ["0"], lock_dir=lock_dir, poll_s=0.05, timeout_s=10,
                      on_wait=said.append) as held:
        return held


def test_a_reservation_waiting_for_two_does_not_sit_on_the_free_one(tmp_path):
    with reserve_gpus(1, ["0"], lock_dir=tmp_path):
        waiter = threading.Thread(target=_wait_for_two, args=(tmp_path,))
        waiter.start()
        time.sleep(0.3)
        # GPU 1 is free; the waiter must not keep it locked while it waits for GPU 0.
        with reserve_gpus(1, GPUS, lock_dir=tmp_path, poll_s=0.01, timeout_s=2) as held:
            assert held == ["1"]
    waiter.join(timeout=10)
    assert not waiter.is_alive()


def _wait_for_two(lock_dir) -> None:
    with reserve_gpus(2, GPUS, lock_dir=lock_dir, poll_s=0.05, timeout_s=10):
        pass


def test_a_killed_holder_leaves_no_gpu_reserved(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; "
         "from skinsense.training.gpus import reserve_gpus\n"
         f"with reserve_gpus(1, ['0'], lock_dir=Path({str(tmp_path)!r})):\n"
         "    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):
            with reserve_gpus(1, ["0"], lock_dir=tmp_path, poll_s=0.05, timeout_s=0.3):
                pass
    finally:
        holder.kill()  # no clean exit: the kernel must drop the lock by itself
        holder.wait()
    with reserve_gpus(1, ["0"], lock_dir=tmp_path, timeout_s=0) as held:
        assert held == ["0"]


def test_more_gpus_than_visible_is_refused_instead_of_waiting_forever(tmp_path):
    with pytest.raises(ValueError, match="3 GPU\\(s\\) wanted, but only 2 are visible"):
        with reserve_gpus(3, GPUS, lock_dir=tmp_path):
            pass
