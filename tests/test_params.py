"""params.yaml validation: every bad value is refused with a message naming the parameter."""

from __future__ import annotations

import copy
import re

import pytest
from pydantic import BaseModel

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.params import parameter_names, parse_params, run_seed
from tests.conftest import default_params, flatten, set_dotted


def test_params_yaml_agrees_with_the_defaults_written_in_the_code() -> None:
    """Fields with a default in the settings classes (the options added after the study's method) must have that
    value in params.yaml: the file and the code cannot drift apart, and the default stays the study's method."""
    params = parse_params(default_params())

    def defaults(section: BaseModel, prefix: str = "") -> dict[str, object]:
        found = {}
        for name, field in type(section).model_fields.items():
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                found |= defaults(value, f"{prefix}{name}.")
            elif not field.is_required():
                found[prefix + name] = (field.get_default(call_default_factory=True), value)
        return found

    found = defaults(params)
    assert {"train.class_balance", "train.augment", "model.resize", "evaluate.target_recall"} <= set(found)
    assert all(default == value for default, value in found.values()), found


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("split.test_ratio", 0.0, "split.test_ratio"),
        ("split.test_ratio", 1.0, "split.test_ratio"),
        ("split.val_ratio", -0.1, "split.val_ratio"),
        ("split.val_ratio", "0.2", "split.val_ratio"),
        ("train.min_epochs", 16, "train.min_epochs"),
        ("train.min_epochs", 0, "train.min_epochs"),
        ("train.patience", -1, "train.patience"),
        ("train.batch_size", 0, "train.batch_size"),
        ("train.lr", 0, "train.lr"),
        ("train.scheduler.factor", 1.5, "train.scheduler.factor"),
        ("train.finetune", "layer3", "train.finetune"),
        ("train.amp", "on", "train.amp"),
        ("evaluate.batch_size", 0, "evaluate.batch_size"),
        ("evaluate.threshold", "max_recall", "evaluate.threshold"),
        ("evaluate.threshold", 1.0, "evaluate.threshold"),
        ("evaluate.target_recall", 0, "evaluate.target_recall"),
        ("evaluate.target_recall", 1.2, "evaluate.target_recall"),
        ("model.resize", "crop", "model.resize"),
        ("train.class_balance", "oversample", "train.class_balance"),
        ("train.best_by", "val_accuracy", "train.best_by"),
        ("train.augment", ["flip", "mixup"], "train.augment"),
        ("train.augment", ["flip", "flip"], "train.augment"),
        ("train.augment", "flip", "train.augment"),
        ("model.arch", "vgg16", "model.arch"),
        ("model.pretrained", "yes", "model.pretrained"),
        ("model.image_size", 8, "model.image_size"),
        ("device", "tpu", "device"),
        ("runs", [], "runs"),
        ("runs", [0, 0], "runs"),
        ("runs", [0, -1], "runs"),
        ("runs", 10, "runs"),
        ("seed", True, "seed"),
        ("data.positive_class", "clean", "data.positive_class"),
        ("data.strict", "no", "data.strict"),
        ("split.group_pattern", "part(", "split.group_pattern"),
        ("split.near_duplicate_rms", -1, "split.near_duplicate_rms"),
    ],
)
def test_bad_parameter_is_named(dotted: str, value: object, named: str) -> None:
    tree = set_dotted(copy.deepcopy(default_params()), dotted, value)
    with pytest.raises(PipelineError, match=named.replace(".", r"\.")):
        parse_params(tree)


def test_missing_parameter_is_named() -> None:
    tree = copy.deepcopy(default_params())
    del tree["train"]["patience"]
    with pytest.raises(PipelineError, match=r"missing parameter 'train\.patience'"):
        parse_params(tree)


def test_run_seeds_are_the_published_ones() -> None:
    # SeedSequence([seed, run]): these values fix every published split and initialisation; a change of the
    # derivation (or of NumPy's) would silently change every result, so they are pinned here.
    assert [run_seed(0, run) for run in range(3)] == [2968811710, 3964924996, 3141116543]
    assert run_seed(3, 0) == 1576890651
    assert len({run_seed(0, run) for run in range(100)}) == 100


@pytest.mark.parametrize(
    ("dotted", "nearest"),
    [
        ("train.epochs", "train.max_epochs"),
        ("sed", "seed"),
        ("model.pretrain", "model.pretrained"),
        ("split.test_ration", "split.test_ratio"),
        ("train.scheduler.factr", "train.scheduler.factor"),
    ],
)
def test_unknown_parameter_is_refused_with_the_nearest_valid_name(dotted: str, nearest: str) -> None:
    tree = set_dotted(copy.deepcopy(default_params()), dotted, 3)
    message = rf"unknown parameter '{re.escape(dotted)}' \(did you mean '{re.escape(nearest)}'\?\)"
    with pytest.raises(PipelineError, match=message):
        parse_params(tree)


def test_unknown_parameter_unlike_any_gets_no_guess() -> None:
    tree = copy.deepcopy(default_params()) | {"zzz": 1}
    with pytest.raises(PipelineError, match=r"unknown parameter 'zzz'; remove it") as raised:
        parse_params(tree)
    assert "did you mean" not in str(raised.value)


def test_params_yaml_holds_exactly_the_known_parameters() -> None:
    assert sorted(flatten(default_params())) == sorted(parameter_names())


def test_a_section_that_is_not_a_mapping_is_named() -> None:
    tree = copy.deepcopy(default_params()) | {"train": 5}
    with pytest.raises(PipelineError, match=r"'train' must be a section \(a mapping of its parameters\), got 5"):
        parse_params(tree)


def test_threshold_is_a_number_or_a_rule_and_augmentation_needs_full_fine_tuning() -> None:
    tree = copy.deepcopy(default_params())
    assert parse_params(set_dotted(tree, "evaluate.threshold", 0.3)).evaluate.threshold == 0.3
    rule = parse_params(set_dotted(tree, "evaluate.threshold", "target_recall")).evaluate
    assert (rule.threshold, rule.target_recall) == ("target_recall", 0.95)
    set_dotted(tree, "train.augment", ["flip"])
    assert parse_params(tree).train.augment == ["flip"]
    with pytest.raises(PipelineError, match=r"'train\.augment' needs 'train\.finetune: all'"):
        parse_params(set_dotted(tree, "train.finetune", "head"))
