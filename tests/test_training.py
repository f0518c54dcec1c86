"""The Fabric training loop on a tiny learnable synthetic set (CPU)."""

from __future__ import annotations

import pytest
import torch

from skinsense.config import TrainConfig
from skinsense.evaluation import evaluate_model_dir
from skinsense.packaging import load_card
from skinsense.training.loop import balanced_accuracy, fit

pytestmark = pytest.mark.slow


def tiny(**kwargs) -> TrainConfig:
    base = {"archs": ["resnet18"], "epochs": 4, "batch_size": 32, "lr": 2e-3,
            "pretrained": False, "num_workers": 0, "seed": 1}
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


def test_balanced_accuracy_ignores_absent_classes():
    confusion = torch.zeros(7, 7, dtype=torch.long)
    confusion[0, 0], confusion[0, 1], confusion[1, 1] = 3, 1, 2
    assert balanced_accuracy(confusion) == pytest.approx((0.75 + 1.0) / 2)
