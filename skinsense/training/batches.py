"""Whole batches straight from the uint8 image cache, without per-sample work.

`BatchedCacheLoader` reads each batch from the memory-mapped cache with one fancy-indexing
call into (pinned) host memory and yields it as a uint8 `(N, 3, H, W)` tensor whose memory
is channels_last (the cache stores NHWC rows, so no transpose is ever done on the CPU). A
background thread reads the next batches while the GPU trains on the current one. What
crosses PCIe is uint8, a quarter of the bytes of float32; conversion, augmentation and
normalization happen on the device (`skinsense.presets`).

A `DataLoader` over `CachedImageDataset` costs one `__getitem__`, one tensor and one collate
copy per image; at H100 speeds (over 1,000 images/s) that Python work is what keeps a
training below the model's own ceiling.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from skinsense.data.records import CachedSplit

Batch = tuple[torch.Tensor, torch.Tensor]
_DONE = object()


class BatchedCacheLoader:
    """Batches of one cached split as `(uint8 (N, 3, H, W) channels_last, int64 (N,))`.

    Args:
        split: The cached split (images `.npy` of shape (n, size, size, 3) and labels).
        batch_size: Images per batch.
        shuffle: Draw a new permutation every epoch (see `set_epoch`).
        drop_last: Leave out the last incomplete batch.
        seed: Base of the permutation's seed; epoch `e` uses `seed + e`.
        pin_memory: Put batches in page-locked memory so host-to-device copies can be
            asynchronous (only meaningful with CUDA).
        prefetch: Batches read ahead by the background thread; 0 reads in the caller.
        rank: This process's rank under DDP.
        world_size: Number of DDP processes; each gets a disjoint shard of every epoch.
    """

    def __init__(self, split: CachedSplit, *, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, pin_memory: bool = False,
                 prefetch: int = 4, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} or rank {rank}/{world_size}")
        self.images_npy, self.size = split.images_npy, split.size
        self.labels = torch.from_numpy(np.load(split.labels_npy).astype(np.int64, copy=False))
        if len(self.labels) != split.n:
            raise ValueError(f"{split.labels_npy} has {len(self.labels)} labels, "
                             f"the record says {split.n}")
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.epoch = seed, 0
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.rank, self.world_size = rank, world_size
        self._images: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of the next pass: the same epoch gives the same order."""
        self.epoch = epoch

    def _shard(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size == 1:
            return order
        if self.shuffle:
            # Training shards must have equal lengths (DDP steps together): pad like
            # DistributedSampler by repeating the start of the permutation.
            per_rank = math.ceil(n / self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - n]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self._shard()) if self.world_size > 1 else len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _array(self) -> torch.Tensor:
        if self._images is None:
            # Copy-on-write map ('c'): a writable view torch can wrap without copying; the
            # file itself is never written.
            images = np.load(self.images_npy, mmap_mode="c")
            if images.shape[1:] != (self.size, self.size, 3) or len(images) != len(self.labels):
                raise ValueError(f"{self.images_npy} has shape {images.shape}, expected "
                                 f"({len(self.labels)}, {self.size}, {self.size}, 3)")
            self._images = torch.from_numpy(images)
        return self._images

    def _read(self, index: torch.Tensor) -> Batch:
        # Sorted rows read the map front to back; the batch is a set, so order is free.
        index = index.sort().values
        rows = self._array()
        out = torch.empty((len(index), *rows.shape[1:]), dtype=torch.uint8,
                          pin_memory=self.pin_memory)
        # torch's gather releases the GIL while it copies (numpy's take holds it), so the
        # training thread keeps launching kernels while this thread reads the next batch.
        # Measured on 2 cores, 300 px batches of 64: a concurrent Python loop slowed by 1.9%
        # beside np.take and by 0.7% beside index_select, which also copies faster
        # (0.69 against 1.07 ms a batch).
        torch.index_select(rows, 0, index, out=out)
        # Labels pinned too: a copy from pageable memory can wait for the GPU to go idle.
        labels = torch.empty(len(index), dtype=torch.int64, pin_memory=self.pin_memory)
        torch.index_select(self.labels, 0, index, out=labels)
        # NHWC memory viewed as NCHW is exactly the channels_last layout.
        return out.permute(0, 3, 1, 2), labels

    def _batches(self) -> Iterator[torch.Tensor]:
        order = self._shard()
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch <= 0:
            for index in self._batches():
                yield self._read(index)
            return
        yield from self._prefetched()

    def _prefetched(self) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for index in self._batches():
                    if stop.is_set():
                        return
                    ready.put(self._read(index))
                ready.put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                ready.put(exc)

        thread = threading.Thread(target=produce, name="cache-batches", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()


def to_device_ahead(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches` moved to `device`, each copied while the GPU still works on the one before.

    On CUDA the host-to-device copy of batch i+1 is issued on a side stream before batch i is
    handed out, so the copy engine moves it while the default stream computes; the compute
    stream waits for that copy only when it uses the batch. Elsewhere (CPU) batches are moved
    as they come. Host batches should be pinned (`BatchedCacheLoader(pin_memory=True)`) for
    the copies to be asynchronous.
    """
    if device.type != "cuda":
        for images, labels in batches:
            yield images.to(device), labels.to(device)
        return
    side = torch.cuda.Stream(device=device)
    compute = torch.cuda.current_stream(device)

    def copy(batch: Batch) -> tuple[Batch, torch.cuda.Event]:
        with torch.cuda.stream(side):
            moved = tuple(t.to(device, non_blocking=True) for t in batch)
            done = torch.cuda.Event()
            done.record(side)
        return moved, done  # type: ignore[return-value]

    def ready(moved: Batch, done: torch.cuda.Event) -> Batch:
        compute.wait_event(done)  # this batch's copy only, not the one issued after it
        for t in moved:
            # Allocated on the side stream, read on the compute stream: without this the
            # allocator could hand the memory out again while the compute stream reads it.
            t.record_stream(compute)
        return moved

    ahead: tuple[Batch, torch.cuda.Event] | None = None
    for batch in batches:
        issued = copy(batch)
        if ahead is not None:
            yield ready(*ahead)
        ahead = issued
    if ahead is not None:
        yield ready(*ahead)
