"""The Fabric training loop on a tiny learnable synthetic set (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from skinsense.config import TrainConfig
from skinsense.evaluation.evaluate import evaluate_model_dir
from skinsense.lifecycle.packaging import load_card
from skinsense.models import IMAGENET_MEAN, IMAGENET_STD
from skinsense.presets import make_preset
from skinsense.training.batches import BatchedCacheLoader
from skinsense.training.launcher import RESULT_FILE, TrainingFailed, train_in_subprocess
from skinsense.training.loop import balanced_accuracy, fit, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def tiny(**kwargs) -> TrainConfig:
    base = {"archs": ["resnet18"], "epochs": 4, "batch_size": 32, "lr": 2e-3,
            "pretrained": False, "num_workers": 0, "seed": 1, "progress": False}
    return TrainConfig(**(base | kwargs))


def test_training_lowers_the_loss_and_beats_chance(cached_sample, tmp_path):
    cache, oversampled = cached_sample
    result = fit(cache, "resnet18", tiny(), out_dir=tmp_path / "run",
                 class_weights=oversampled.class_weights)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    evaluation = evaluate_model_dir(result.model_dir, cache.test, out_dir=tmp_path / "eval")
    assert evaluation.metrics["balanced_accuracy"] > 1 / 7 + 0.05  # chance is 1/7
    card = load_card(result.model_dir)
    assert card.arch == "resnet18" and card.image_size == 32 and len(card.class_codes) == 7


def test_resume_after_a_kill_gives_the_same_result(cached_sample, tmp_path):
    cache, _ = cached_sample
    full = fit(cache, "resnet18", tiny(epochs=3), out_dir=tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_after_epoch_2(epoch, metrics):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):  # dies after the epoch-2 checkpoint was written
        fit(cache, "resnet18", tiny(epochs=3), out_dir=tmp_path / "killed",
            on_epoch_end=kill_after_epoch_2)
    resumed = fit(cache, "resnet18", tiny(epochs=3), out_dir=tmp_path / "killed")
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in full.history], rel=1e-5)
    assert resumed.best_val_balanced_accuracy == pytest.approx(full.best_val_balanced_accuracy)


def test_early_stopping_restores_the_best_epoch(cached_sample, tmp_path):
    cache, _ = cached_sample
    # lr 0 never improves after the first epoch: patience 2 stops after epoch 3.
    result = fit(cache, "resnet18", tiny(epochs=10, lr=1e-12, early_stopping_patience=2),
                 out_dir=tmp_path / "run")
    assert result.epochs_run == 3 and result.best_epoch == 1


def test_a_diverged_training_stops_with_advice_and_keeps_the_last_good_checkpoint(
        cached_sample, tmp_path):
    cache, _ = cached_sample
    # NaN class weights make the loss itself NaN on the first batch: the loop no longer
    # checks the gradient norm every step, so the epoch-end check must catch it.
    with pytest.raises(FloatingPointError, match="Lower lr") as caught:
        fit(cache, "resnet18", tiny(epochs=2), out_dir=tmp_path / "run",
            class_weights=[float("nan")] * 7)
    assert "epoch 1" in str(caught.value) and "nothing was checkpointed" in str(caught.value)
    assert not (tmp_path / "run" / "last.ckpt").exists()  # nothing non-finite was saved


def test_balanced_accuracy_ignores_absent_classes():
    confusion = torch.zeros(7, 7, dtype=torch.long)
    confusion[0, 0], confusion[0, 1], confusion[1, 1] = 3, 1, 2
    assert balanced_accuracy(confusion) == pytest.approx((0.75 + 1.0) / 2)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # On a shared 2-core CI box, two OpenMP threads that spin-wait while other jobs hold the
    # cores make these tiny convolutions 5-10x slower than one thread (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_net() -> nn.Module:
    # No batch norm: with it, two batches of 16 rightly differ from one batch of 32.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 7))


def _one_optimizer_step(batches, **train_kwargs) -> torch.Tensor:
    """Parameter change of one SGD(lr=1) pass over `batches`: minus the applied gradient."""
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = _tiny_net()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    preset = make_preset("eval", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train_one_epoch(fabric, model, batches, optimizer, scheduler, preset, **train_kwargs)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def _random_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 7, (n,), generator=generator)


def test_gradient_accumulation_equals_one_big_batch():
    images, labels = _random_batch(32)
    big = _one_optimizer_step([(images, labels)], grad_clip_norm=None)
    halves = [(images[:16], labels[:16]), (images[16:], labels[16:])]
    accumulated = _one_optimizer_step(halves, grad_accum_steps=2, grad_clip_norm=None)
    two_steps = _one_optimizer_step(halves, grad_accum_steps=1, grad_clip_norm=None)
    assert big.abs().max() > 0
    torch.testing.assert_close(accumulated, big, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(two_steps, big, rtol=1e-4, atol=1e-6)


def test_gradient_clipping_bounds_the_gradient_norm():
    batch = [_random_batch(32)]
    unclipped = _one_optimizer_step(batch, grad_clip_norm=None)
    clipped = _one_optimizer_step(batch, grad_clip_norm=0.01)
    assert unclipped.norm() > 0.05
    assert clipped.norm() <= 0.01 * (1 + 1e-4)
    # Clipping rescales the whole gradient: the direction stays.
    torch.testing.assert_close(clipped / clipped.norm(), unclipped / unclipped.norm(),
                               rtol=1e-4, atol=1e-6)


def test_batched_loader_covers_the_split_in_a_seeded_order(cached_sample):
    cache, _ = cached_sample
    rows, labels = np.load(cache.train.images_npy), np.load(cache.train.labels_npy)
    loader = BatchedCacheLoader(cache.train, batch_size=32, shuffle=True, seed=5)

    def one_epoch(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader.set_epoch(epoch)
        return list(loader)

    batches = one_epoch(1)
    assert len(batches) == len(loader) == -(-cache.train.n // 32)
    images = torch.cat([b[0] for b in batches])
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    # Every row exactly once, each with its own label.
    seen = zip([r.tobytes() for r in images.permute(0, 2, 3, 1).numpy()],
               torch.cat([b[1] for b in batches]).tolist())
    assert sorted(seen) == sorted(zip([r.tobytes() for r in rows], labels.tolist()))
    again, other = one_epoch(1), one_epoch(2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches, other))


def test_batched_loader_gives_ddp_ranks_disjoint_equal_shards(cached_sample):
    cache, _ = cached_sample
    shards = []
    for rank in (0, 1):
        loader = BatchedCacheLoader(cache.val, batch_size=8, shuffle=True, rank=rank,
                                    world_size=2, prefetch=0)
        shards.append(torch.cat([labels for _, labels in loader]))
    assert cache.val.n % 2 == 0  # so that no padding is needed and the shards partition
    assert len(shards[0]) == len(shards[1]) == cache.val.n // 2
    all_labels = torch.from_numpy(np.load(cache.val.labels_npy))
    assert torch.equal(torch.bincount(torch.cat(shards), minlength=7),
                       torch.bincount(all_labels, minlength=7))


def test_train_preset_without_randomness_is_the_eval_preset():
    images, _ = _random_batch(4)
    still = make_preset("train", mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(1.0, 1.0),
                        ratio=(1.0, 1.0), max_rotation_deg=0.0, hflip=False, vflip=False,
                        color_jitter=0.0)
    plain = make_preset("eval", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    torch.testing.assert_close(still(images), plain(images), rtol=0, atol=1e-4)
    augmented = make_preset("train", mean=IMAGENET_MEAN, std=IMAGENET_STD)(images)
    assert augmented.shape == images.shape and augmented.dtype == torch.float32
    assert augmented.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(augmented, plain(images))


def test_train_preset_crops_follow_scale_and_ratio():
    preset = make_preset("train", mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.25, 0.25),
                         ratio=(4.0, 4.0), max_rotation_deg=0.0, hflip=False, vflip=False)
    theta_grid = preset._random_grid(64, torch.zeros(64, 3, 16, 16))
    width = theta_grid[:, 0, -1, 0] - theta_grid[:, 0, 0, 0]   # x span over one row
    height = theta_grid[:, -1, 0, 1] - theta_grid[:, 0, 0, 1]  # y span over one column
    # Area 1/4 with aspect 4: a full-width crop (1.0) a quarter high, in grid units x 15/16.
    torch.testing.assert_close(width, torch.full((64,), 2 * 1.0 * 15 / 16))
    torch.testing.assert_close(height, torch.full((64,), 2 * 0.25 * 15 / 16))


def test_train_in_subprocess_trains_in_a_child_and_logs_to_mlflow(cached_sample, tmp_path,
                                                                    capsys):
    from mlflow import MlflowClient

    cache, oversampled = cached_sample
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("training-child")).info.run_id
    result = train_in_subprocess(cache, "resnet18", tiny(epochs=1), out_dir=tmp_path / "run",
                                 class_weights=oversampled.class_weights,
                                 card_extra={"split_seed": 7}, mlflow_run_id=run_id,
                                 env={"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
    out = capsys.readouterr().out
    child_pid = int(out.split("training worker pid=")[1].split()[0])
    assert child_pid != os.getpid()
    assert "resnet18 epoch 1/1" in out  # the child's progress reached our stdout
    assert result.epochs_run == 1 and result.model_dir.is_dir()
    assert load_card(result.model_dir).split_seed == 7
    history = client.get_metric_history(run_id, "val_balanced_accuracy")
    assert [m.step for m in history] == [1]
    assert history[0].value == pytest.approx(result.history[0]["val_balanced_accuracy"])


def test_a_crashing_child_raises_training_failed_with_its_error(cached_sample, tmp_path):
    cache, _ = cached_sample
    cfg = tiny(epochs=1, weights_path=str(tmp_path / "missing.pt"))
    with pytest.raises(TrainingFailed, match="missing.pt for resnet18 does not exist") as failure:
        train_in_subprocess(cache, "resnet18", cfg, out_dir=tmp_path / "run",
                            env={"OMP_NUM_THREADS": "1"})
    assert failure.value.returncode != 0
    assert "WeightsUnavailableError" in failure.value.output_tail


def test_a_diverged_child_is_flagged_so_it_is_not_retried(cached_sample, tmp_path):
    from prefect.states import Failed

    from tasks.training import _not_diverged

    cache, _ = cached_sample
    with pytest.raises(TrainingFailed, match="FloatingPointError.*Lower lr") as failure:
        train_in_subprocess(cache, "resnet18", tiny(epochs=1), out_dir=tmp_path / "run",
                            class_weights=[float("nan")] * 7, env={"OMP_NUM_THREADS": "1"})
    assert failure.value.diverged
    # The train task's retry condition, on the Prefect states such failures produce.
    assert not _not_diverged(None, None, Failed(data=failure.value))
    crashed = TrainingFailed("killed", returncode=-9, output_tail="")
    assert _not_diverged(None, None, Failed(data=crashed))


def test_ddp_on_two_cpu_processes_validates_the_model_it_saves(cached_sample, tmp_path, capsys):
    cache, oversampled = cached_sample
    result = train_in_subprocess(cache, "resnet18", tiny(epochs=2, devices=2, accelerator="cpu"),
                                 out_dir=tmp_path / "run", class_weights=oversampled.class_weights,
                                 env={"OMP_NUM_THREADS": "1"})
    out = capsys.readouterr().out
    assert {line.split("rank=")[1].split(":")[0] for line in out.splitlines()
            if line.startswith("training worker pid=")} == {"0", "1"}  # torchrun ran two ranks
    assert result.epochs_run == 2 and result.model_dir.is_dir()
    # The model rank 0 saved, run alone over the whole validation part, must give the loss
    # and balanced accuracy the two ranks summed for its epoch: so both ranks held the same
    # weights and batch-norm statistics, and every validation image was counted once.
    _assert_saved_model_scores_its_best_epoch(result, cache)


def _assert_saved_model_scores_its_best_epoch(result, cache) -> None:
    """The saved model folder, loaded afresh, gives the best epoch's validation figures."""
    from skinsense.evaluation.predict import predict_probabilities

    best = result.history[result.best_epoch - 1]
    probabilities = predict_probabilities(result.model_dir, cache.val, batch_size=16)
    labels = np.load(cache.val.labels_npy)
    loss = -np.log(probabilities[np.arange(len(labels)), labels]).mean()
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), labels=range(7))
    assert balanced_accuracy(torch.from_numpy(confusion)) == pytest.approx(
        best["val_balanced_accuracy"])


def test_a_compiled_training_saves_a_plain_model_with_its_best_weights(cached_sample, tmp_path):
    cache, _ = cached_sample
    # accelerator='cpu' asks for compile on the CPU (inductor; about a minute here).
    result = fit(cache, "resnet18", tiny(epochs=1, compile=True, accelerator="cpu"),
                 out_dir=tmp_path / "run")
    # Loaded into an uncompiled network (no '_orig_mod.' keys), the weights score exactly
    # what the compiled model scored in validation.
    _assert_saved_model_scores_its_best_epoch(result, cache)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, 'auto' compiles on the GPU")
def test_compile_is_skipped_with_a_message_when_auto_lands_on_the_cpu(cached_sample, tmp_path,
                                                                       capsys):
    cache, _ = cached_sample
    result = fit(cache, "resnet18", tiny(epochs=1, compile=True), out_dir=tmp_path / "run")
    assert "compile=True skipped: training runs on cpu" in capsys.readouterr().out
    assert result.epochs_run == 1


def test_a_training_child_sees_only_the_gpu_no_other_training_holds(cached_sample, tmp_path,
                                                                   monkeypatch, capsys):
    from skinsense.training import launcher
    from skinsense.training.gpus import reserve_gpus

    # Two GPUs as far as the launcher knows; the child still trains on this CPU.
    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["0", "1"])
    cache, _ = cached_sample
    locks = tmp_path / "locks"
    with reserve_gpus(1, ["0"], lock_dir=locks):  # another training holds GPU 0
        train_in_subprocess(cache, "resnet18", tiny(epochs=1), out_dir=tmp_path / "run",
                            gpu_lock_dir=locks, env={"OMP_NUM_THREADS": "1"})
    assert "resnet18 on GPU(s) 1" in capsys.readouterr().out
    # Its reservation ended with the child: both GPUs are free again.
    with reserve_gpus(2, ["0", "1"], lock_dir=locks, timeout_s=0):
        pass


def test_training_on_the_cpu_leaves_the_cuda_backend_flags_alone(cached_sample, tmp_path):
    from skinsense.training.loop import configure_backends

    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        configure_backends(tiny(), L.Fabric(accelerator="cpu", devices=1))
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved


def test_more_devices_than_gpus_is_refused_before_training(cached_sample, tmp_path):
    cache, _ = cached_sample
    gpus = torch.cuda.device_count()
    wanted = max(gpus + 1, 2)
    with pytest.raises(ValueError, match=f"needs {wanted} CUDA GPUs, but this machine has {gpus}"):
        train_in_subprocess(cache, "resnet18", tiny(devices=wanted), out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / RESULT_FILE).exists()


def test_fit_refuses_to_start_ddp_processes_itself(cached_sample, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cache, _ = cached_sample
    with pytest.raises(RuntimeError, match="train_in_subprocess"):
        fit(cache, "resnet18", tiny(devices=2, accelerator="cpu"), out_dir=tmp_path / "run")


def test_throughput_benchmark_runs_on_the_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--device", "cpu",
         "--archs", "resnet18", "--steps", "2", "--rounds", "2", "--warmup", "1", "--batch", "4",
         "--images", "24", "--size-override", "32", "--workers", "1",
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path),
             "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| resnet18 |" in out.stdout and "ratio" in out.stdout
    report = json.loads((tmp_path / "train_throughput.json").read_text())
    assert report["results"][0]["arch"] == "resnet18"
    row = report["results"][0]
    assert row["pipeline_images_per_s"] > 0 and row["ceiling_images_per_s"] > 0
    assert row["static_images_per_s"] > 0 and row["loader_images_per_s"] > 0
    assert 0 < row["ratio"] < 10
