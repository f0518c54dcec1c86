"""Counts, around the real functions (a spy, not a stand-in), how often a model folder's
weights and card are read and the card written, and what goes through the network."""

from __future__ import annotations

import skinsense.evaluation.predict as predict_module
from skinsense.lifecycle import packaging
from skinsense.lifecycle.packaging import ModelCard


class LoadSpy:
    """Installed with pytest's `monkeypatch`; each count starts at zero.

    - `weights`: the files `safetensors.torch.load_file` read as `skinsense.lifecycle.packaging`
      calls it (every `load_model_dir` passes there, wherever it was imported from);
    - `card_reads`, `card_writes`: `ModelCard.model_validate` / `model_dump_json` calls;
    - `passes`: images in each call of `skinsense.evaluation.predict.forward_batches`.
    """

    def __init__(self, monkeypatch) -> None:
        self.weights: list[str] = []
        self.card_reads = self.card_writes = 0
        self.passes: list[int] = []
        real_load, real_forward = packaging.load_file, predict_module.forward_batches
        real_validate = ModelCard.model_validate.__func__
        real_dump = ModelCard.model_dump_json

        def load_file(path, *args, **kwargs):
            self.weights.append(str(path))
            return real_load(path, *args, **kwargs)

        def model_validate(cls, *args, **kwargs):
            self.card_reads += 1
            return real_validate(cls, *args, **kwargs)

        def model_dump_json(card, *args, **kwargs):
            self.card_writes += 1
            return real_dump(card, *args, **kwargs)

        def forward_batches(loaded, batches, **kwargs):
            batches = list(batches)
            self.passes.append(sum(len(b) for b in batches))
            return real_forward(loaded, batches, **kwargs)

        monkeypatch.setattr(packaging, "load_file", load_file)
        monkeypatch.setattr(ModelCard, "model_validate", classmethod(model_validate))
        monkeypatch.setattr(ModelCard, "model_dump_json", model_dump_json)
        monkeypatch.setattr(predict_module, "forward_batches", forward_batches)
