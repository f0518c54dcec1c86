"""ONNX Runtime sessions that use the machine's cores, one request or many.

One request alone should use every core (ONNX Runtime's intra-op threads split each
convolution); several requests at once should each get their own core, since splitting
every small convolution of several requests over the same cores only adds synchronisation
and oversubscribes them. `OnnxRunner` holds two sessions of the same file for that: a wide
one (`threads` intra-op threads) that a run takes when no other run is in flight, and a
narrow one (`threads // concurrency` threads, at least 1) that concurrent runs share (an
InferenceSession's `run` is thread-safe, and with one intra-op thread each run computes on
its caller's thread). No lock serializes requests. The app admits at most `concurrency`
model requests at once (Gradio's `concurrency_limit`), so at most `threads` threads compute
at a time, plus the wide run's while the first concurrent run starts.

Both numbers come from the cores this process may use (`skinsense.lifecycle.export.cpu_threads`, the
affinity mask, which containers narrow) unless `ServeConfig.model_threads` and
`ServeConfig.concurrency_limit` set them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from skinsense.lifecycle.export import cpu_threads, onnx_session


def serving_threads(model_threads: int | None = None) -> int:
    """Intra-op threads of a request that runs alone: the setting, else every usable core."""
    return max(1, model_threads or cpu_threads())


def serving_concurrency(concurrency_limit: int | None = None) -> int:
    """Model requests the app runs at once: the setting, else one per usable core."""
    return max(1, concurrency_limit or cpu_threads())


class OnnxRunner:
    """An ONNX Runtime model that serves one request with all its threads and concurrent
    requests with a core each (see the module docstring).

    It answers `run`, `get_outputs`, `get_inputs` and `get_modelmeta` like an
    InferenceSession, so the predictor treats both alike.

    Args:
        onnx_path: the model file.
        threads: intra-op threads of a lone run (default `serving_threads()`).
        concurrency: how many runs may be in flight at once (default
            `serving_concurrency()`); 1 loads only the wide session.
    """

    def __init__(self, onnx_path: Path, *, threads: int | None = None,
                 concurrency: int | None = None) -> None:
        self.threads = serving_threads(threads)
        self.concurrency = serving_concurrency(concurrency)
        self.narrow_threads = max(1, self.threads // self.concurrency)
        self.wide = onnx_session(onnx_path, threads=self.threads)
        self.narrow = (onnx_session(onnx_path, threads=self.narrow_threads)
                       if self.concurrency > 1 and self.narrow_threads < self.threads
                       else self.wide)
        self._in_flight = 0
        self._count_lock = threading.Lock()  # guards the counter only, never a run

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list:
        """`InferenceSession.run` on the wide session when alone, else on the narrow one."""
        with self._count_lock:
            alone = self._in_flight == 0
            self._in_flight += 1
        try:
            return (self.wide if alone else self.narrow).run(output_names, feeds)
        finally:
            with self._count_lock:
                self._in_flight -= 1

    def get_outputs(self):
        return self.wide.get_outputs()

    def get_inputs(self):
        return self.wide.get_inputs()

    def get_modelmeta(self):
        return self.wide.get_modelmeta()

    def describe(self) -> dict[str, int]:
        """What /health shows: threads of a lone run, of a concurrent run, runs at once."""
        return {"threads": self.threads, "concurrent_threads": self.narrow_threads,
                "concurrency": self.concurrency}
