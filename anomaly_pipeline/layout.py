"""Every path and file name the pipeline writes or reads, defined once for writers and readers alike.

A stage writes a folder through ``files.atomic_dir`` (a temporary folder renamed into place): it names the files
inside with the same class the readers use, built on the temporary folder (``ModelFiles(out).history``), so a
name is never spelled twice. The paths are those dvc.yaml declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from anomaly_pipeline.errors import PipelineError

RUNS_DIR = Path("data/runs")
RUN_METRICS_DIR = Path("metrics/runs")
FEATURES_DIR = Path("data/features")
DECODED_DIR = Path("data/decoded")
EXPORTS_DIR = Path("data/exports")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "sha256"]


@dataclass(frozen=True)
class SplitFiles:
    """prepare-split's folder: a manifest per split and the split's report."""

    dir: Path

    def manifest(self, split: str) -> Path:
        return self.dir / f"{split}.csv"

    @property
    def report(self) -> Path:
        return self.dir / "report.json"


@dataclass(frozen=True)
class ModelFiles:
    """train's folder: the model, its per-epoch history and the training summary."""

    dir: Path

    @property
    def model(self) -> Path:
        return self.dir / "model.pt"

    @property
    def history(self) -> Path:
        return self.dir / "history.csv"

    @property
    def summary(self) -> Path:
        return self.dir / "train_summary.json"


@dataclass(frozen=True)
class EvalFiles:
    """evaluate's folder: the test predictions and copies of the misclassified images with their heatmaps."""

    dir: Path

    @property
    def predictions(self) -> Path:
        return self.dir / "predictions.csv"

    @property
    def false_positives(self) -> Path:
        return self.dir / "false_positives"

    @property
    def false_negatives(self) -> Path:
        return self.dir / "false_negatives"

    def misclassified_copy(self, relative: str, label: int) -> Path:
        """Where a misclassified test image is copied: false_positives/ (true label clean) or false_negatives/."""
        return (self.false_positives if label == 0 else self.false_negatives) / relative.replace("/", "__")

    @staticmethod
    def heatmap(image_copy: Path) -> Path:
        """The Grad-CAM heatmap of a copied misclassified image: beside it, ``<name>.gradcam.png``."""
        return image_copy.with_name(image_copy.name + ".gradcam.png")


@dataclass(frozen=True)
class FeatureFiles:
    """features' folder: the frozen layers' output per distinct image, and what made it."""

    dir: Path = FEATURES_DIR

    @property
    def features(self) -> Path:
        return self.dir / "features.pt"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"


@dataclass(frozen=True)
class StoreFiles:
    """decode's folder: every distinct image decoded once, one uint8 row each, with its index and description."""

    dir: Path = DECODED_DIR

    @property
    def images(self) -> Path:
        return self.dir / "images.u8"

    @property
    def index(self) -> Path:
        return self.dir / "index.csv"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"


@dataclass(frozen=True)
class RunPaths:
    """Where one run's outputs live."""

    run: int

    @property
    def root(self) -> Path:
        return RUNS_DIR / f"run-{self.run}"

    @property
    def split(self) -> SplitFiles:
        return SplitFiles(self.root / "split")

    @property
    def model(self) -> ModelFiles:
        return ModelFiles(self.root / "model")

    @property
    def eval(self) -> EvalFiles:
        return EvalFiles(self.root / "eval")

    @property
    def metrics_file(self) -> Path:
        return RUN_METRICS_DIR / f"run-{self.run}.json"

    @property
    def exports_dir(self) -> Path:
        return EXPORTS_DIR / f"run-{self.run}"


@dataclass(frozen=True)
class AggregateFiles:
    """aggregate's outputs: the DVC metric, the statistics, the per-run table, the report and the plot data."""

    dir: Path = Path("metrics")

    @property
    def headline(self) -> Path:
        return self.dir / "headline.json"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    @property
    def runs_table(self) -> Path:
        return self.dir / "runs.csv"

    @property
    def report(self) -> Path:
        return self.dir / "report.html"

    def plot(self, name: str) -> Path:
        """Plot data (``predictions``, ``history``, ``roc``, ``precision_recall``): metrics/plots/<name>.csv."""
        return self.dir / "plots" / f"{name}.csv"


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a split manifest (columns path, label, sha256)."""
    if not path.is_file():
        raise PipelineError(f"split manifest {path} is missing: run 'dvc repro' so prepare-split writes it")
    return pd.read_csv(path, dtype={"path": str, "label": int, "sha256": str})
