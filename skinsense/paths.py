"""The layout of `SKINSENSE_HOME`: every file a run keeps has its place here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skinsense.config import skinsense_home


@dataclass(frozen=True)
class Home:
    """Folders under one root; created on first use by `ensure()`."""

    root: Path

    @classmethod
    def default(cls) -> Home:
        return cls(skinsense_home())

    @property
    def downloads(self) -> Path:
        """Archives and metadata exactly as fetched (verified files only, `.part` while loading)."""
        return self.root / "downloads"

    @property
    def images(self) -> Path:
        """Extracted JPEGs, one flat folder per source fingerprint."""
        return self.root / "images"

    @property
    def datasets(self) -> Path:
        """Validated manifests, splits and oversampled copies, one folder per fingerprint."""
        return self.root / "datasets"

    @property
    def cache(self) -> Path:
        """Decoded uint8 image arrays, keyed by size and data fingerprint."""
        return self.root / "cache"

    @property
    def runs(self) -> Path:
        """Checkpoints and evaluation outputs of training runs."""
        return self.root / "runs"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def app(self) -> Path:
        """Pid file and log of the deployed app."""
        return self.root / "app"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> Home:
        for path in (self.downloads, self.images, self.datasets, self.cache, self.runs,
                     self.mlflow, self.app, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        return self
