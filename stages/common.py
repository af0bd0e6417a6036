"""Code shared by the pipeline stages: parameters, run layout, atomic files, image decoding, logging.

It does not import torch (2 s to import here), so prepare-split and aggregate start fast; the torch side
(network, features, inference) is in stages/network.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, get_type_hints

import numpy as np
import pandas as pd
import psutil
import yaml
from PIL import Image, ImageOps

PARAMS_FILE = Path("params.yaml")
# The study's dataset: the study-data stage fetches it here (pinned, checked); the default data.dir.
STUDY_DATA_DIR = Path("data/raw")
OWN_DATA_COMMAND = ("dvc exp run -S data.dir=/path/to/images -S data.negative_class=clean "
                    "-S data.positive_class=faulty")
RUNS_DIR = Path("data/runs")
RUN_METRICS_DIR = Path("metrics/runs")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}
SPLITS = ("train", "val", "test")
ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
DEVICES = ("auto", "cpu", "cuda")
# train.finetune: which part of the network trains. Everything before that part is frozen.
FINETUNE_MODES = ("all", "layer4", "head")
# model.resize: how an image becomes image_size x image_size.
RESIZE_MODES = ("squash", "pad")
# train.class_balance: how training counters a class imbalance.
CLASS_BALANCE_MODES = ("none", "weighted_loss", "sampler")
# train.augment: training-only random changes of each image (torchvision.transforms.v2).
AUGMENTATIONS = ("flip", "rotate90", "affine", "color")
# evaluate.threshold, when a rule instead of a number: computed on each run's validation images.
THRESHOLD_RULES = ("max_balanced_accuracy", "target_recall")

log = logging.getLogger("anomaly_pipeline")


class PipelineError(Exception):
    """An error caused by the user's data or parameters; its message says what to fix."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class DataParams:
    dir: Path
    negative_class: str
    positive_class: str
    strict: bool

    @property
    def is_study_dataset(self) -> bool:
        """Whether 'data.dir' is the study's own dataset, which the study-data stage fetches."""
        return self.dir == STUDY_DATA_DIR


@dataclass(frozen=True)
class SplitParams:
    test_ratio: float
    val_ratio: float
    group_pattern: str
    near_duplicate_rms: float


@dataclass(frozen=True)
class ModelParams:
    arch: str
    pretrained: bool
    image_size: int
    resize: str = "squash"


@dataclass(frozen=True)
class SchedulerParams:
    factor: float
    patience: int


@dataclass(frozen=True)
class TrainParams:
    batch_size: int
    lr: float
    min_epochs: int
    max_epochs: int
    patience: int
    scheduler: SchedulerParams
    finetune: str = "all"
    amp: bool = False
    class_balance: str = "none"
    augment: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    threshold: float | str
    target_recall: float = 0.95


@dataclass(frozen=True)
class Params:
    seed: int
    runs: tuple[int, ...]
    data: DataParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    device: str


def _get(tree: dict[str, Any], dotted: str, kind: type | tuple[type, ...]) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise PipelineError(f"params.yaml: missing parameter '{dotted}'")
        node = node[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(node, bool) and bool not in kinds or not isinstance(node, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise PipelineError(f"params.yaml: '{dotted}' must be {names}, got {node!r}")
    return node


def parameter_names(section: type = None, prefix: str = "") -> list[str]:
    """Every valid dotted parameter name (``train.max_epochs``), from the fields of the parameter dataclasses."""
    section = section or Params
    names = []
    for name, kind in get_type_hints(section).items():
        if dataclasses.is_dataclass(kind):
            names += parameter_names(kind, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def _given_names(tree: dict[str, Any], sections: set[str], prefix: str = "") -> list[str]:
    """The dotted names in a parameter tree, descending only into the known sections."""
    names = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        names += _given_names(value, sections, name + ".") if name in sections and isinstance(value, dict) else [name]
    return names


def _reject_unknown(tree: dict[str, Any]) -> None:
    """PipelineError for the first key of ``tree`` that is no parameter, naming the nearest valid one."""
    valid = parameter_names()
    sections = {name.rsplit(".", depth)[0] for name in valid for depth in range(1, name.count(".") + 1)}
    for name in _given_names(tree, sections):
        if name in valid or name in sections:  # a section that is not a mapping: the type checks name its keys
            continue
        scored = sorted((-difflib.SequenceMatcher(None, name, candidate).ratio(), candidate) for candidate in valid)
        hint = f" (did you mean '{scored[0][1]}'?)" if -scored[0][0] >= 0.6 else ""
        raise PipelineError(f"params.yaml: unknown parameter '{name}'{hint}; remove it or correct its name")


def _threshold(value: int | float | str) -> float | str:
    """evaluate.threshold: a number as float, a rule name as it is."""
    return value if isinstance(value, str) else float(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PipelineError(f"params.yaml: {message}")


def parse_params(tree: dict[str, Any]) -> Params:
    """Validate a parameter tree (as read from params.yaml) and return it typed."""
    _reject_unknown(tree)
    number = (int, float)
    runs = _get(tree, "runs", list)
    _require(len(runs) > 0, "'runs' must list at least one run index, e.g. [0, 1, 2]")
    _require(
        all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in runs),
        f"'runs' must be a list of non-negative integers, got {runs!r}",
    )
    _require(len(set(runs)) == len(runs), f"'runs' holds a duplicate index: {runs!r}")
    params = Params(
        seed=_get(tree, "seed", int),
        runs=tuple(runs),
        data=DataParams(
            dir=Path(_get(tree, "data.dir", str)),
            negative_class=_get(tree, "data.negative_class", str),
            positive_class=_get(tree, "data.positive_class", str),
            strict=_get(tree, "data.strict", bool),
        ),
        split=SplitParams(
            test_ratio=float(_get(tree, "split.test_ratio", number)),
            val_ratio=float(_get(tree, "split.val_ratio", number)),
            group_pattern=_get(tree, "split.group_pattern", str),
            near_duplicate_rms=float(_get(tree, "split.near_duplicate_rms", number)),
        ),
        model=ModelParams(
            arch=_get(tree, "model.arch", str),
            pretrained=_get(tree, "model.pretrained", bool),
            image_size=_get(tree, "model.image_size", int),
            resize=_get(tree, "model.resize", str),
        ),
        train=TrainParams(
            batch_size=_get(tree, "train.batch_size", int),
            lr=float(_get(tree, "train.lr", number)),
            min_epochs=_get(tree, "train.min_epochs", int),
            max_epochs=_get(tree, "train.max_epochs", int),
            patience=_get(tree, "train.patience", int),
            scheduler=SchedulerParams(
                factor=float(_get(tree, "train.scheduler.factor", number)),
                patience=_get(tree, "train.scheduler.patience", int),
            ),
            finetune=_get(tree, "train.finetune", str),
            amp=_get(tree, "train.amp", bool),
            class_balance=_get(tree, "train.class_balance", str),
            augment=tuple(_get(tree, "train.augment", list)),
        ),
        evaluate=EvaluateParams(batch_size=_get(tree, "evaluate.batch_size", int),
                                threshold=_threshold(_get(tree, "evaluate.threshold", (int, float, str))),
                                target_recall=float(_get(tree, "evaluate.target_recall", number))),
        device=_get(tree, "device", str),
    )
    _require(params.data.negative_class != params.data.positive_class,
             "'data.negative_class' and 'data.positive_class' must name different folders")
    for name in ("test_ratio", "val_ratio"):
        value = getattr(params.split, name)
        _require(0 < value < 1, f"'split.{name}' must lie strictly between 0 and 1, got {value}")
    try:
        re.compile(params.split.group_pattern)
    except re.error as error:
        raise PipelineError(f"params.yaml: 'split.group_pattern' is not a valid regular expression: {error}") from error
    _require(0 <= params.split.near_duplicate_rms <= 255,
             f"'split.near_duplicate_rms' must lie in 0..255 grey levels (0 turns the check off), "
             f"got {params.split.near_duplicate_rms}")
    _require(params.model.arch in ARCHITECTURES,
             f"'model.arch' must be one of {', '.join(ARCHITECTURES)}, got {params.model.arch!r}")
    _require(params.model.image_size >= 32,
             f"'model.image_size' must be at least 32 pixels, got {params.model.image_size}")
    _require(params.train.batch_size >= 1, f"'train.batch_size' must be >= 1, got {params.train.batch_size}")
    _require(params.evaluate.batch_size >= 1,
             f"'evaluate.batch_size' must be >= 1, got {params.evaluate.batch_size}")
    threshold = params.evaluate.threshold
    _require(threshold in THRESHOLD_RULES if isinstance(threshold, str) else 0 < threshold < 1,
             f"'evaluate.threshold' must be a number strictly between 0 and 1 or one of {', '.join(THRESHOLD_RULES)}, "
             f"got {threshold!r}")
    _require(0 < params.evaluate.target_recall <= 1,
             f"'evaluate.target_recall' must lie in (0, 1], got {params.evaluate.target_recall}")
    _require(params.model.resize in RESIZE_MODES,
             f"'model.resize' must be one of {', '.join(RESIZE_MODES)}, got {params.model.resize!r}")
    _require(params.train.class_balance in CLASS_BALANCE_MODES,
             f"'train.class_balance' must be one of {', '.join(CLASS_BALANCE_MODES)}, got {params.train.class_balance!r}")
    _require(not params.train.augment or params.train.finetune == "all",
             f"'train.augment' needs 'train.finetune: all': with {params.train.finetune!r} the frozen layers' "
             f"output is computed once per image and cannot change from epoch to epoch")
    unknown = [name for name in params.train.augment if name not in AUGMENTATIONS]
    _require(not unknown and len(set(params.train.augment)) == len(params.train.augment),
             f"'train.augment' must list distinct names out of {', '.join(AUGMENTATIONS)} ([] for none), "
             f"got {list(params.train.augment)!r}")
    _require(params.train.lr > 0, f"'train.lr' must be > 0, got {params.train.lr}")
    _require(params.train.min_epochs >= 1, f"'train.min_epochs' must be >= 1, got {params.train.min_epochs}")
    _require(params.train.min_epochs <= params.train.max_epochs,
             f"'train.min_epochs' ({params.train.min_epochs}) must not exceed "
             f"'train.max_epochs' ({params.train.max_epochs})")
    _require(params.train.patience >= 0, f"'train.patience' must be >= 0, got {params.train.patience}")
    _require(0 < params.train.scheduler.factor < 1,
             f"'train.scheduler.factor' must lie strictly between 0 and 1, got {params.train.scheduler.factor}")
    _require(params.train.scheduler.patience >= 0,
             f"'train.scheduler.patience' must be >= 0, got {params.train.scheduler.patience}")
    _require(params.train.finetune in FINETUNE_MODES,
             f"'train.finetune' must be one of {', '.join(FINETUNE_MODES)}, got {params.train.finetune!r}")
    _require(params.device in DEVICES,
             f"'device' must be one of {', '.join(DEVICES)}, got {params.device!r}")
    return params


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the stages from the project root")
    with path.open() as handle:
        tree = yaml.safe_load(handle)
    if not isinstance(tree, dict):
        raise PipelineError(f"{path} must hold a mapping of parameters")
    return parse_params(tree)


def run_seed(seed: int, run: int) -> int:
    """The seed of one run: different for every run, reproducible from (seed, run)."""
    return int(np.random.SeedSequence([seed, run]).generate_state(1)[0])


# --------------------------------------------------------------------------- run layout


@dataclass(frozen=True)
class RunPaths:
    """Where one run's outputs live (the same paths dvc.yaml declares)."""

    run: int

    @property
    def root(self) -> Path:
        return RUNS_DIR / f"run-{self.run}"

    @property
    def split_dir(self) -> Path:
        return self.root / "split"

    def manifest(self, split: str) -> Path:
        return self.split_dir / f"{split}.csv"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def model_file(self) -> Path:
        return self.model_dir / "model.pt"

    @property
    def history_file(self) -> Path:
        return self.model_dir / "history.csv"

    @property
    def train_summary_file(self) -> Path:
        return self.model_dir / "train_summary.json"

    @property
    def live_dir(self) -> Path:
        return self.root / "live"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def metrics_file(self) -> Path:
        return RUN_METRICS_DIR / f"run-{self.run}.json"


HEATMAP_SUFFIX = ".gradcam.png"


def heatmap_path(image_copy: Path) -> Path:
    """Where evaluate writes the Grad-CAM heatmap of a copied misclassified image: beside it, ``<name>.gradcam.png``."""
    return image_copy.with_name(image_copy.name + HEATMAP_SUFFIX)


def misclassified_copy(eval_dir: Path, relative: str, label: int) -> Path:
    """Where evaluate copies a misclassified test image: false_positives/ (true label clean) or false_negatives/."""
    folder = "false_positives" if label == 0 else "false_negatives"
    return eval_dir / folder / relative.replace("/", "__")


def run_arg(description: str, params: Params) -> int:
    """Parse the ``--run N`` argument every per-run stage takes, checked against params.runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=int, required=True, help="run index, one of params.yaml 'runs'")
    return check_run(parser.parse_args().run, params)


def check_run(run: int, params: Params) -> int:
    """``run`` if params.yaml lists it in 'runs', else PipelineError naming the runs there are."""
    if run not in params.runs:
        raise PipelineError(f"--run {run} is not one of params.yaml 'runs' {list(params.runs)}: choose one of those")
    return run


# --------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so it is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV atomically."""
    write_text_atomic(path, frame.to_csv(index=False))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    Temporary folders that a killed earlier attempt left beside ``path`` are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> Any:
    with path.open() as handle:
        return json.load(handle)


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class FolderListing:
    """What a class folder holds: image files, and other files that are not images."""

    images: list[Path]
    others: list[Path]


def list_folder(root: Path) -> FolderListing:
    """Files under ``root`` (recursively, sorted): images by extension, and everything else.

    Hidden files and folders (``.DS_Store``, ``.git``) and system files (``Thumbs.db``) are left out of both.
    """
    images, others = [], []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.name.lower() in SYSTEM_FILES:
            continue
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return FolderListing(images, others)


def class_dirs(data_dir: Path, negative_class: str, positive_class: str) -> tuple[Path, Path]:
    """The negative and the positive class folder under ``data_dir``; PipelineError naming the fix if one is missing."""
    if not data_dir.is_dir():
        raise PipelineError(
            f"data folder {data_dir} (params.yaml 'data.dir') does not exist. Point it at a folder with one "
            f"subfolder per class, for example: {OWN_DATA_COMMAND}"
        )
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_name in (negative_class, positive_class):
        if class_name not in folders:
            raise PipelineError(
                f"class folder {data_dir / class_name} does not exist (folders present: {folders}); set "
                f"'data.negative_class' / 'data.positive_class' in params.yaml to your two class folder names"
            )
    return data_dir / negative_class, data_dir / positive_class


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit greyscale scaled down, transparency composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, converted to 8-bit RGB.

    Raises PipelineError naming the file when it is empty, truncated, not an image or too large.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise PipelineError(f"{path}: too large to decode safely ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = "empty file" if path.stat().st_size == 0 else f"{type(error).__name__}: {error}"
        raise PipelineError(f"{path}: cannot be decoded as an image ({reason})") from error


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a split manifest (columns path, label, sha256)."""
    if not path.is_file():
        raise PipelineError(f"split manifest {path} is missing: run 'dvc repro' so prepare-split writes it")
    return pd.read_csv(path, dtype={"path": str, "label": int, "sha256": str})


def weights_label(pretrained: bool) -> str:
    return "imagenet" if pretrained else "random-init"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main_guard(main: Any) -> None:
    """Run a stage's main(): user errors become one clear line and exit code 1, Ctrl-C exits 130.

    After a successful main() in a process that imported torch, the process ends at once, all output
    flushed, without the interpreter's teardown of torch's modules (0.6 s of every stage here, with
    nothing to write: the stage's outputs are already complete).
    """
    setup_logging()
    try:
        main()
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted; outputs of this stage were not written, rerun 'dvc repro' to resume")
        sys.exit(130)
    if "torch" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
