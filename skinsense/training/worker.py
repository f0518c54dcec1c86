"""The training child: `python -m skinsense.training.worker SPEC_JSON` (or under torchrun).

Reads the spec `skinsense.training.launcher` wrote, runs `fit`, and (rank 0 only) writes the
`TrainResult` as JSON where the spec says. With an MLflow run id in the spec, rank 0 logs
every epoch's metrics to that run; MLflow is imported only then, so the worker runs where
only torch, torchvision and lightning are installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from skinsense.config import TrainConfig
from skinsense.data.records import ImageCache
from skinsense.training.loop import EpochCallback, fit


def _mlflow_logger(run_id: str) -> EpochCallback:
    from skinsense.lifecycle import tracking

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(run_id, metrics, step=epoch)

    return log_epoch


def main(spec_path: str) -> None:
    """Train as the spec says and write the result file (rank 0)."""
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"training worker pid={os.getpid()} rank={rank}: {spec['arch']}"
          + (f" on GPU(s) {gpus}" if gpus else ""), flush=True)
    run_id = spec.get("mlflow_run_id")
    result = fit(ImageCache.model_validate(spec["cache"]), spec["arch"],
                 TrainConfig.model_validate(spec["cfg"]), out_dir=Path(spec["out_dir"]),
                 class_weights=spec.get("class_weights"), card_extra=spec.get("card_extra"),
                 on_epoch_end=_mlflow_logger(run_id) if run_id and rank == 0 else None)
    if rank == 0:
        result_path = Path(spec["result"])
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(result.model_dump_json(indent=1))
        os.replace(tmp, result_path)  # the parent never reads half a file
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Rank 0 may be on another node than the one that reads the result (multi-node):
        # no agent ends before the result is written.
        torch.distributed.barrier()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m skinsense.training.worker SPEC_JSON")
    main(sys.argv[1])
