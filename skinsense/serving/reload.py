"""Hot reload: the served model follows the registry alias without a restart.

`ModelHolder.current` is the one reference every request reads once at its start; a reload
builds the new `LoadedModel` completely (loaded and test-classified) and only then replaces
that reference. Requests in flight finish on the model they started with, and a new model
that fails to load or to classify is never served: the old one stays, and the failure is
logged and shown by /health as `reload_error`. So is a new model whose out-of-domain gate
file is damaged: at a reload the app keeps the version it has (at a cold start there is
none to keep, and the page says the gate is damaged).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from skinsense.serving.loading import (
    LoadedModel,
    ResolvedModel,
    is_model_dir,
    load_model,
    resolve_model,
    utc_now,
)
from skinsense.trust.gate import GateDamagedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadOutcome:
    """What one registry check did."""

    swapped: bool
    version: str | None  # the version served after the check
    error: str | None = None


class ModelHolder:
    """The model being served, swapped atomically when the registry alias moves.

    Args:
        model_uri: `models:/NAME@ALIAS` to follow an alias; a pinned version or a model
            folder is loaded once and reloaded only when asked (`reload(force=True)`).
        smoke_image: an image the new model must classify before it is served.
        loader, resolver: injectable for tests; default `load_model`, `resolve_model`.

    Raises:
        Whatever the first load raises: an app without a model has nothing to serve.
    """

    def __init__(self, model_uri: str, *, smoke_image: Path | None = None,
                 loader: Callable[[str, ResolvedModel], LoadedModel] = load_model,
                 resolver: Callable[[str], ResolvedModel] = resolve_model) -> None:
        self.model_uri = model_uri
        self._smoke_image = smoke_image
        self._load = loader
        self._resolve = resolver
        self._reload_lock = threading.Lock()  # one load at a time; requests never take it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._failed_version: str | None = None
        self.reload_error: str | None = None
        self.last_check_at: str | None = None
        self.last_reload_at: str | None = None
        self._current = self._load_checked(model_uri, self._resolve(model_uri))
        self.last_check_at = self._current.loaded_at

    @property
    def current(self) -> LoadedModel:
        """The model to use for one request; read it once and keep the reference."""
        return self._current

    def reload(self, *, force: bool = False) -> ReloadOutcome:
        """Check the alias and swap to the version it points at when that differs.

        Args:
            force: load again even when the version is unchanged (a model folder, or a
                version that failed before and may load now).
        """
        with self._reload_lock:
            self.last_check_at = utc_now()
            served = self._current
            try:
                target = self._resolve(self.model_uri)
            except Exception as exc:  # registry down: keep serving what we have
                return self._fail(served, f"cannot resolve {self.model_uri}: {exc}")
            unchanged = target.version == served.version and not is_model_dir(self.model_uri)
            if not force and (unchanged or target.version is None):
                if unchanged:
                    self.reload_error = None  # the alias is back on the served version
                    self._failed_version = None
                return ReloadOutcome(False, served.version, self.reload_error)
            if not force and target.version == self._failed_version:
                # Retried on a forced reload or a new alias target only, so a broken version
                # is not loaded again (seconds of CPU each) on every watcher tick.
                return ReloadOutcome(False, served.version, self.reload_error)
            try:
                loaded = self._load_checked(self.model_uri, target, reloading=True)
            except Exception as exc:
                self._failed_version = target.version
                return self._fail(served, f"version {target.version or target.pinned_uri} "
                                          f"failed to load: {type(exc).__name__}: {exc}")
            self._current = loaded
            self.reload_error = None
            self._failed_version = None
            self.last_reload_at = loaded.loaded_at
            log.info("now serving %s version %s (was version %s)", self.model_uri,
                     loaded.version, served.version)
            return ReloadOutcome(True, loaded.version)

    def _fail(self, served: LoadedModel, why: str) -> ReloadOutcome:
        self.reload_error = f"{why}; still serving version {served.version}"
        log.error("reload failed: %s", self.reload_error)
        return ReloadOutcome(False, served.version, self.reload_error)

    def _load_checked(self, model_uri: str, target: ResolvedModel, *,
                      reloading: bool = False) -> LoadedModel:
        loaded = self._load(model_uri, target)
        if reloading and loaded.predictor.gate_status == "damaged":
            # Serving it would drop the out-of-domain check that the served version has.
            raise GateDamagedError(f"its out-of-domain gate is damaged: "
                                   f"{loaded.predictor.gate_note}")
        if self._smoke_image is not None:
            # A model that loads but cannot classify (wrong input size, broken export) must
            # not replace one that can.
            probabilities = loaded.predictor.classify(self._smoke_image)
            if not 0.99 < sum(probabilities.values()) < 1.01:
                raise ValueError(f"test classification gave probabilities summing to "
                                 f"{sum(probabilities.values()):.3f}")
        return loaded

    def start_watching(self, interval_s: float) -> None:
        """Check the alias every `interval_s` seconds in a daemon thread (0: never)."""
        if interval_s <= 0 or self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, args=(interval_s,),
                                         name="skinsense-reload", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        """Stop the watcher thread (waits for a reload in progress)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.reload()
            except Exception:  # the watcher must outlive any surprise
                log.exception("registry check failed")
