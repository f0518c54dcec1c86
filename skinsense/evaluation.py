"""Evaluation of a model folder on a held-out cached part: probabilities and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from skinsense.data.records import CachedSplit
from skinsense.labels import CLASS_CODES
from skinsense.packaging import load_card, load_model_dir
from skinsense.presets import make_preset


class EvalResult(BaseModel):
    """Metrics of one model on one part, and where the details were written."""

    arch: str
    model_dir: Path
    metrics: dict[str, float]
    report_json: Path
    n_images: int


@torch.inference_mode()
def predict_probabilities(model_dir: Path, split: CachedSplit, *, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, 7) of the model folder on a cached part, on the CPU or GPU."""
    model, card = load_model_dir(model_dir)
    if card.image_size != split.size:
        raise ValueError(
            f"model in {model_dir} takes {card.image_size} px inputs but the cache holds "
            f"{split.size} px images; build the cache at {card.image_size} px"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    preset = make_preset("eval", mean=card.mean, std=card.std).to(device)
    images = np.load(split.images_npy, mmap_mode="r")
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        batch = batch.permute(0, 3, 1, 2).to(device)
        out.append(torch.softmax(model(preset(batch)).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(CLASS_CODES)), dtype=np.float32)


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Balanced accuracy (the ISIC 2018 Task 3 metric), accuracy and macro F1."""
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(CLASS_CODES)))
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
    }


def evaluate_model_dir(model_dir: Path, split: CachedSplit, *, out_dir: Path,
                       batch_size: int = 64) -> EvalResult:
    """Evaluate a model folder on a cached part; writes the report and confusion matrix."""
    probabilities = predict_probabilities(model_dir, split, batch_size=batch_size)
    y_true = np.load(split.labels_npy)
    metrics = classification_metrics(y_true, probabilities)
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(CLASS_CODES)))
    report = {
        "metrics": metrics,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_codes": list(CLASS_CODES),
        "classification_report": classification_report(
            y_true, y_pred, labels=labels, target_names=list(CLASS_CODES),
            output_dict=True, zero_division=0),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    report_json = out_dir / "evaluation.json"
    report_json.write_text(json.dumps(report, indent=2))
    np.save(out_dir / "test_probabilities.npy", probabilities)
    return EvalResult(arch=load_card(Path(model_dir)).arch, model_dir=Path(model_dir), metrics=metrics,
                      report_json=report_json, n_images=len(y_true))
