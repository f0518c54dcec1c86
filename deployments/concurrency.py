"""The global concurrency limit `gpu`: one slot per GPU, taken by each training task.

On one GPU the slot makes training tasks run one after another, even when several pipeline
runs overlap; with N GPUs up to N train at once.
"""

from __future__ import annotations

import os

from deployments.definitions import GPU_LIMIT


def gpu_slots() -> int:
    """`$SKINSENSE_GPU_SLOTS`, else the number of visible CUDA devices (at least 1).

    A machine without a GPU still gets one slot: CPU training of two models at once on the
    same cores is slower than one after the other.
    """
    if os.environ.get("SKINSENSE_GPU_SLOTS"):
        return max(1, int(os.environ["SKINSENSE_GPU_SLOTS"]))
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def ensure_gpu_limit(slots: int | None = None) -> int:
    """Create the `gpu` global concurrency limit on the Prefect server, or set its size.

    Returns:
        The number of slots the limit has now.
    """
    from prefect.client.orchestration import get_client

    slots = slots or gpu_slots()
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
    return slots
