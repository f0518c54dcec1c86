"""Multi-node DDP on one machine: two torchrun agents on localhost as two "nodes".

Each agent runs one CPU (gloo) rank; they meet at a c10d rendezvous on 127.0.0.1. The first
is started by `train_in_subprocess` (what the train task runs), the second by the command an
operator runs on the other node, `skinsense train-node SPEC`. Two nodes of one rank must train
exactly what one node of two ranks trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from skinsense.config import TrainConfig
from skinsense.training.launcher import SPEC_FILE, join_training, train_in_subprocess, worker_command
from test_training import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_multi_node_runs_the_same_c10d_command_on_every_node(tmp_path):
    cfg = tiny(num_nodes=2, devices=4, accelerator="cpu", rdzv_endpoint="gpu-1.lan:29400")
    spec = tmp_path / "3f2a" / SPEC_FILE
    command = worker_command(spec, cfg)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
            "--rdzv-endpoint=gpu-1.lan:29400", "--rdzv-id=3f2a"} <= set(command)
    assert "--standalone" not in command and command[-1] == str(spec)


def test_multi_node_settings_are_checked_up_front():
    with pytest.raises(ValueError, match="needs rdzv_endpoint as HOST:PORT"):
        TrainConfig(archs=["resnet18"], num_nodes=2)
    with pytest.raises(ValueError, match="needs rdzv_endpoint as HOST:PORT"):
        TrainConfig(archs=["resnet18"], num_nodes=2, rdzv_endpoint="gpu-1.lan")
    # Two trainings at once would meet at the same rendezvous port.
    for at_once in ({"parallel_archs": True}, {"fan_out": True}):
        with pytest.raises(ValueError, match="one architecture at a time"):
            TrainConfig(archs=["resnet18", "mobilenet_v3_small"], num_nodes=2,
                        rdzv_endpoint="gpu-1.lan:29400", **at_once)
        TrainConfig(archs=["resnet18"], num_nodes=2, rdzv_endpoint="gpu-1.lan:29400",
                    **at_once)
    # Scheduling settings do not change what a training produces: same run folder.
    plain = TrainConfig(archs=["resnet18"])
    assert TrainConfig(archs=["resnet18"], fan_out=True, rdzv_timeout_s=60).run_key() == \
        plain.run_key()
    assert "num_nodes" not in plain.run_key()
    assert TrainConfig(archs=["resnet18"], num_nodes=2,
                       rdzv_endpoint="h:1").run_key()["num_nodes"] == 2


def test_joining_needs_the_spec_and_the_shared_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="shared SKINSENSE_HOME"):
        join_training(tmp_path / "nowhere" / SPEC_FILE)


@pytest.mark.slow
def test_two_nodes_of_one_rank_train_what_one_node_of_two_ranks_trains(cached_sample, tmp_path,
                                                                      free_port):
    cache, oversampled = cached_sample
    env = {"OMP_NUM_THREADS": "1"}
    one_node = train_in_subprocess(
        cache, "resnet18", tiny(epochs=2, devices=2, accelerator="cpu"),
        out_dir=tmp_path / "one-node", class_weights=oversampled.class_weights, env=env)

    cfg = tiny(epochs=2, devices=1, num_nodes=2, accelerator="cpu",
               rdzv_endpoint=f"127.0.0.1:{free_port}", rdzv_timeout_s=300)
    out_dir = tmp_path / "two-nodes"
    outcome: dict = {}

    def first_node() -> None:
        try:
            outcome["result"] = train_in_subprocess(
                cache, "resnet18", cfg, out_dir=out_dir,
                class_weights=oversampled.class_weights, env=env)
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    node0 = threading.Thread(target=first_node)
    node0.start()
    spec = out_dir / SPEC_FILE
    deadline = time.monotonic() + 120
    while not spec.exists() and node0.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert spec.exists(), outcome.get("error")
    # The second "node": the command the first one printed, in a process of its own.
    node1 = subprocess.run([sys.executable, "-m", "skinsense.cli", "train-node", str(spec)],
                           capture_output=True, text=True, timeout=600, cwd=ROOT,
                           env={**os.environ, **env})
    node0.join(timeout=600)
    assert not node0.is_alive()
    assert node1.returncode == 0, node1.stdout[-3000:] + node1.stderr[-3000:]
    assert "error" not in outcome, outcome.get("error")
    two_nodes = outcome["result"]
    ranks = {line.split("rank=")[1].split(":")[0]
             for line in node1.stdout.splitlines() if line.startswith("training worker pid=")}
    assert len(ranks) == 1  # one rank ran on the joining node (torchrun decides which)

    assert two_nodes.epochs_run == one_node.epochs_run == 2
    for got, want in zip(two_nodes.history, one_node.history, strict=True):
        for key in ("train_loss", "val_loss", "val_balanced_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    weights = [load_file(r.model_dir / "weights.safetensors") for r in (two_nodes, one_node)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[1]:
        assert weights[0][name].float().allclose(weights[1][name].float(), rtol=1e-5,
                                                 atol=1e-6), name
