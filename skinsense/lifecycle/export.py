"""ONNX export of a model folder, for fast CPU serving with ONNX Runtime.

`export_onnx` writes `model.onnx` next to `weights.safetensors` and `model_card.json`. The
graph takes what the evaluation preset produces (float32, NCHW, normalized with the card's
mean and std, side `card.image_size`) with a dynamic batch axis, and returns two outputs:
raw logits (N, 7) in the card's class order, and the penultimate features (N, D), the input
of the classifier head, which the out-of-domain gate (`skinsense.trust.gate`) scores, so that the
gate costs no second forward pass. The predictor divides the logits by the card's
temperature and applies the softmax, exactly as it does for the PyTorch model (so a
recalibrated card, or a refitted gate, needs no new export). The file is self-contained
(no external data file) and records the SHA-256 of the weights it was exported from, so a
stale export is never served.

It uses PyTorch's torch.export-based exporter (`dynamo=True`, which needs onnxscript): the
TorchScript-based exporter is deprecated in torch 2.14 and slated for removal.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from skinsense.lifecycle.packaging import WEIGHTS_FILE, ModelCard, load_model_dir
from skinsense.models import LogitsAndFeatures

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "image", "logits", "features"
WEIGHTS_SHA256_KEY = "skinsense.weights_sha256"
# Opset 20 is torch 2.14's default (so no version conversion runs) and ONNX Runtime has run
# it since 1.17; pinned so a torch upgrade cannot silently need a newer runtime.
OPSET = 20


class OnnxMismatchError(RuntimeError):
    """The exported ONNX model does not compute what the PyTorch model computes."""


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 of a model folder's `weights.safetensors`."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(model_dir: Path, out_path: Path | None = None, *,
                model: torch.nn.Module | None = None, card: ModelCard | None = None) -> Path:
    """Export a model folder's network to ONNX and check the file with `onnx.checker`.

    Args:
        model_dir: a model folder (weights.safetensors + model_card.json).
        out_path: where to write; default `model_dir / "model.onnx"`.
        model, card: the folder's network (on the CPU) and card when the caller has loaded
            them already (the evaluate stage); None reads them from the folder.

    Returns:
        The path of the written ONNX file (input `image`: float32 (batch, 3, S, S),
        normalized; outputs `logits`: float32 (batch, num_classes), before softmax, and
        `features`: float32 (batch, D), the classifier head's input).

    Raises:
        Exception: whatever the exporter or the checker raises; no partial file is left.
    """
    import onnx

    model_dir = Path(model_dir)
    if model is None or card is None:
        model, card = load_model_dir(model_dir)
    out_path = Path(out_path) if out_path is not None else model_dir / ONNX_FILE
    size = card.image_size
    # A batch of 2 in the example: torch.export specializes a dimension whose example is 1.
    example = torch.zeros(2, 3, size, size)
    program = torch.onnx.export(
        LogitsAndFeatures(model).eval(), (example,), dynamo=True, verbose=False,
        opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        external_data=False)
    program.model.metadata_props[WEIGHTS_SHA256_KEY] = weights_sha256(model_dir)
    program.model.metadata_props["skinsense.arch"] = card.arch
    program.model.metadata_props["skinsense.output"] = f"{OUTPUT_NAME},{FEATURES_NAME}"
    # Write beside the target and rename, so a failed export never leaves a half file that
    # the predictor (or a registry upload of the folder) would pick up.
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        program.save(str(tmp), external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def cpu_threads() -> int:
    """Cores this process may use (the affinity mask, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


def onnx_session(onnx_path: Path, *, threads: int | None = None, spinning: bool = False):
    """An ONNX Runtime CPU session for `onnx_path` with one intra-op thread per core.

    `spinning` off (the default): ONNX Runtime's intra-op threads otherwise busy-wait after
    each run, and in the app, where requests come tens of milliseconds apart and Gradio's
    event loop, the upload and the JPEG decode need the same cores, they take those cores
    from the work that finishes the request. Measured on 2 cores (efficientnet_b0, bench/
    serve_latency.py): request p50 79.5 -> 65.3 ms, 2 clients 17 -> 26 requests/s; a run
    alone after an idle pause pays about 3 ms to wake the threads.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    # One request at a time already fills the cores; inter-op parallelism only oversubscribes.
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning",
                                     "1" if spinning else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def onnx_has_features(session) -> bool:
    """True when an ONNX Runtime session's model also outputs the penultimate features
    (exports made before the out-of-domain gate output logits only)."""
    return FEATURES_NAME in {output.name for output in session.get_outputs()}


def check_onnx_agrees(model_dir: Path, *, atol: float = 1e-4, n: int = 4, seed: int = 0) -> float:
    """Run PyTorch and ONNX Runtime on the same random inputs; compare logits and features.

    Both run in fp32 on the CPU. The inputs are standard-normal, which is what normalized
    images look like; the batch of `n` and a single image are both checked, so the dynamic
    batch axis is exercised too.

    Args:
        model_dir: a model folder holding `model.onnx` (see `export_onnx`).
        atol: the largest acceptable absolute difference of any logit.
        n: batch size of the random inputs.
        seed: seed of the inputs (a local generator; the global RNG is untouched).

    Returns:
        The largest absolute difference seen (logits and features).

    Raises:
        FileNotFoundError: there is no `model.onnx` in `model_dir`.
        OnnxMismatchError: the file has no features output, or a difference is above `atol`.
    """
    model_dir = Path(model_dir)
    onnx_path = model_dir / ONNX_FILE
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no {ONNX_FILE}; run export_onnx first")
    model, card = load_model_dir(model_dir)
    split = LogitsAndFeatures(model).eval()
    session = onnx_session(onnx_path)
    if not onnx_has_features(session):
        raise OnnxMismatchError(f"{onnx_path} outputs no '{FEATURES_NAME}' (an export from "
                                f"before the out-of-domain gate); export it again")
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(n, 3, card.image_size, card.image_size, generator=generator)
    max_diff = 0.0
    for inputs in (batch, batch[:1]):
        with torch.inference_mode():
            expected = [t.float().numpy() for t in split(inputs)]
        got = session.run([OUTPUT_NAME, FEATURES_NAME],
                          {INPUT_NAME: np.ascontiguousarray(inputs.numpy())})
        for name, g, e in zip((OUTPUT_NAME, FEATURES_NAME), got, expected, strict=True):
            if g.shape != e.shape:
                raise OnnxMismatchError(f"ONNX {name} shape {g.shape}, PyTorch {e.shape}")
            max_diff = max(max_diff, float(np.max(np.abs(g - e))))
    if not max_diff <= atol:  # also catches NaN
        raise OnnxMismatchError(
            f"{onnx_path}: ONNX Runtime and PyTorch logits or features differ by up to "
            f"{max_diff:.3g} (allowed {atol:g})")
    return max_diff
