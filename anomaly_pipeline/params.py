"""params.yaml as typed, validated settings (pydantic v2): each constraint written beside its field.

Validation is strict: a string is never read as a number, nor a number as a boolean. An unknown key anywhere
is refused with the nearest valid name; every message names the parameter, what it must be and what it got.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anomaly_pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
# The study's dataset: the study-data stage fetches it here (pinned, checked); the default data.dir.
STUDY_DATA_DIR = Path("data/raw")
# Your own images (with the default network, ImageNet features that need no download).
OWN_DATA_COMMAND = "dvc exp run -S data.dir=/path/to/images -S data.negative_class=clean -S data.positive_class=faulty"

# Where a model's starting weights came from (ModelParams.weights): the one label train records and evaluate,
# aggregate and the report pass on.
IMAGENET = "imagenet"
RANDOM_INIT = "random-init"

def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"values must be distinct, got {values}")
    return values


Ratio = Annotated[float, Field(gt=0, lt=1)]
Finetune = Literal["all", "last_block", "head"]
ThresholdRule = Literal["max_balanced_accuracy", "target_recall"]
Augmentation = Literal["flip", "rotate90", "affine", "color"]
BestBy = Literal["val_loss", "val_roc_auc"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(Section):
    dir: Annotated[Path, Field(strict=False, description="the folder with one subfolder per class")]
    negative_class: str = Field(min_length=1, description="the clean class's folder name")
    positive_class: str = Field(min_length=1, description="the faulty class's folder name")
    strict: bool = Field(description="true: unreadable image files stop the run; false: they are skipped")

    @model_validator(mode="after")
    def _two_classes(self) -> DataParams:
        if self.negative_class == self.positive_class:
            raise ValueError("'data.negative_class' and 'data.positive_class' must name different folders")
        return self

    @property
    def is_study_dataset(self) -> bool:
        """Whether 'data.dir' is the study's own dataset, which the study-data stage fetches."""
        return self.dir == STUDY_DATA_DIR


class SplitParams(Section):
    test_ratio: Ratio = Field(description="per class, the share of images that go to test, between 0 and 1")
    val_ratio: Ratio = Field(description="per class, the share of the rest that goes to validation, between 0 and 1")
    group_pattern: str = Field(description="a regular expression over file names; equal keys stay together")
    near_duplicate_rms: float = Field(ge=0, le=255, description="grey levels RMS in 0..255 (0 turns the check off)")

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from error
        return pattern


class ModelParams(Section):
    arch: Literal["resnet18", "resnet34", "resnet50", "efficientnet_lite0"]
    pretrained: bool = Field(description="true: ImageNet weights; false: random initialisation")
    image_size: int = Field(ge=32, description="pixels, at least 32")
    resize: Literal["squash", "pad"] = "squash"

    @property
    def weights(self) -> str:
        """Where the starting weights come from: 'imagenet' (pretrained) or 'random-init'."""
        return IMAGENET if self.pretrained else RANDOM_INIT


class SchedulerParams(Section):
    factor: Ratio = Field(description="the learning-rate factor on a plateau, between 0 and 1")
    patience: int = Field(ge=0)


class TrainParams(Section):
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_epochs: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    patience: int = Field(ge=0, description="epochs without a better validation figure (train.best_by) before training "
                                            "stops")
    best_by: BestBy = "val_loss"
    scheduler: SchedulerParams
    finetune: Finetune = "all"
    amp: bool = False
    class_balance: Literal["none", "weighted_loss", "sampler"] = "none"
    augment: Annotated[list[Augmentation], AfterValidator(_distinct)] = Field(
        default_factory=list, description="distinct names, [] for none")
    head_epochs: int = Field(0, ge=0, description="epochs that train the classifier alone before all layers train")
    backbone_lr_factor: float = Field(1.0, gt=0, le=1,
                                      description="the backbone's learning rate as a fraction of train.lr, in (0, 1]")
    freeze_bn_stats: bool = Field(False, description="true: batch norm keeps the running statistics it was loaded with")

    @property
    def recipe(self) -> dict[str, object]:
        """The fine-tuning options set away from the study's method (they need 'train.finetune: all')."""
        return {name: getattr(self, name) for name, study in (("head_epochs", 0), ("backbone_lr_factor", 1.0),
                                                              ("freeze_bn_stats", False)) if getattr(self, name) != study}

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"'train.min_epochs' ({self.min_epochs}) must not exceed 'train.max_epochs' "
                             f"({self.max_epochs})")
        if self.recipe and self.finetune != "all":
            raise ValueError(f"{', '.join(f'train.{name}' for name in self.recipe)} need 'train.finetune: all': with "
                             f"{self.finetune!r} only the layers after the frozen ones train")
        if self.head_epochs >= self.max_epochs:
            raise ValueError(f"'train.head_epochs' ({self.head_epochs}) must be below 'train.max_epochs' "
                             f"({self.max_epochs}): all layers must train for at least one epoch")
        if self.augment and self.finetune != "all":
            raise ValueError(f"'train.augment' needs 'train.finetune: all': with {self.finetune!r} the frozen "
                             f"layers' output is computed once per image and cannot change from epoch to epoch")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)
    threshold: Union[Annotated[float, Field(gt=0, lt=1)], ThresholdRule] = Field(
        union_mode="left_to_right",
        description="a number strictly between 0 and 1, or max_balanced_accuracy or target_recall")
    target_recall: float = Field(0.95, gt=0, le=1, description="the share of defects target_recall catches, in (0, 1]")


class Params(Section):
    seed: int
    runs: Annotated[list[Annotated[int, Field(ge=0)]], AfterValidator(_distinct)] = Field(
        min_length=1, description="distinct run indices, e.g. [0, 1, 2]")
    data: DataParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    device: Literal["auto", "cpu", "cuda"]


def parameter_names(section: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every valid dotted parameter name (``train.max_epochs``), from the fields of the settings classes."""
    names = []
    for name, field in section.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += parameter_names(kind, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def _nearest(name: str) -> str:
    scored = sorted((-difflib.SequenceMatcher(None, name, valid).ratio(), valid) for valid in parameter_names())
    return f" (did you mean '{scored[0][1]}'?)" if -scored[0][0] >= 0.6 else ""


def _message(error: dict[str, Any]) -> str:
    """One pydantic error as the project's message: the dotted name, what it must be, what it got."""
    names = [part for part in error["loc"] if isinstance(part, str)]
    # A union adds its member's type to the location (e.g. 'float', "literal['a']"): not part of the name.
    dotted = ".".join(part for part in names if part.isidentifier())
    got = f", got {error.get('input')!r}"
    field = _field(dotted)
    description = field.description if field is not None and field.description else ""
    if error["type"] == "extra_forbidden":
        return f"unknown parameter '{dotted}'{_nearest(dotted)}; remove it or correct its name"
    if error["type"] == "missing":
        return f"missing parameter '{dotted}'"
    if error["type"] in ("model_type", "dict_type"):
        return f"'{dotted}' must be a section (a mapping of its parameters){got}"
    if len(names) > len(dotted.split(".")) and description:
        return f"'{dotted}' must be {description}{got}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "value_error":
        return message if message.startswith("'") else f"'{dotted}': {message}"
    hint = f" ({description})" if description else ""
    return f"'{dotted}'{hint}: {message[0].lower()}{message[1:]}{got}"


def _field(dotted: str) -> Any:
    section: type[BaseModel] = Params
    *parents, leaf = dotted.split(".") if dotted else [""]
    for name in parents:
        annotation = section.model_fields[name].annotation if name in section.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section.model_fields.get(leaf)


def parse_params(tree: dict[str, Any]) -> Params:
    """Validate a parameter tree (as read from params.yaml) and return it typed; PipelineError on the first error
    (an unknown key first: it is the likeliest cause of the others)."""
    try:
        return Params.model_validate(tree)
    except ValidationError as error:
        errors = sorted(error.errors(), key=lambda item: item["type"] != "extra_forbidden")
        raise PipelineError(f"params.yaml: {_message(errors[0])}") from None


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


def check_run(run: int, params: Params) -> int:
    """``run`` if params.yaml lists it in 'runs', else PipelineError naming the runs there are."""
    if run not in params.runs:
        raise PipelineError(f"--run {run} is not one of params.yaml 'runs' {list(params.runs)}: choose one of those")
    return run
