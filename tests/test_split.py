"""prepare-split: stratified, grouped by content, disjoint, complete, deterministic; bad data refused."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.layout import SPLITS
from anomaly_pipeline.params import OWN_DATA_COMMAND, run_seed
from anomaly_pipeline.split import group_ids, scan_dataset, split_groups, split_report
from tests.conftest import picture, save_image, study_like_dataset


@pytest.fixture(scope="module")
def metal_table(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The study's 700 files with its byte-identical copies (generated pictures)."""
    return scan_dataset(study_like_dataset(tmp_path_factory.mktemp("study-like")), "clean", "faulty")[0]


def split(table: pd.DataFrame, seed: int, test_ratio: float = 0.3, val_ratio: float = 0.2) -> pd.Series:
    return split_groups(table, group_ids(table, ""), test_ratio, val_ratio, np.random.default_rng(seed))


def test_scan_reads_every_image_with_its_label_and_hash(metal_table: pd.DataFrame) -> None:
    assert (metal_table["label"] == 0).sum() == 100 and (metal_table["label"] == 1).sum() == 600
    assert metal_table["path"].str.startswith(("clean/", "faulty/")).all()
    # The study's documented duplicates: 49 distinct clean images, 525 distinct faulty ones.
    distinct = metal_table.groupby("label")["sha256"].nunique()
    assert distinct[0] == 49 and distinct[1] == 525


def test_split_covers_every_image_once_and_honours_ratios_per_class(metal_table: pd.DataFrame) -> None:
    assignment = split(metal_table, run_seed(0, 0))
    assert set(assignment) == set(SPLITS)
    for label, size in ((0, 100), (1, 600)):
        sides = assignment[metal_table["label"] == label].value_counts()
        assert sides.sum() == size
        test_target = round(size * 0.3)
        val_target = round((size - test_target) * 0.2)
        # Whole duplicate groups move together, so a side may overshoot by less than the largest group (4).
        assert test_target <= sides["test"] < test_target + 4
        assert val_target <= sides["val"] < val_target + 4
        assert sides["train"] == size - sides["test"] - sides["val"]


def test_identical_images_never_straddle_the_split(metal_table: pd.DataFrame) -> None:
    for run in range(5):
        assignment = split(metal_table, run_seed(0, run))
        sides_per_hash = assignment.groupby(metal_table["sha256"]).nunique()
        assert (sides_per_hash == 1).all()


def test_split_is_deterministic_per_seed_and_differs_between_runs(metal_table: pd.DataFrame) -> None:
    first = split(metal_table, run_seed(0, 0))
    assert first.equals(split(metal_table, run_seed(0, 0)))
    assert not first.equals(split(metal_table, run_seed(0, 1)))
    assert not first.equals(split(metal_table, run_seed(3, 0)))


def test_report_counts_duplicates(metal_table: pd.DataFrame) -> None:
    assignment = split(metal_table, 1)
    report = split_report(metal_table, group_ids(metal_table, ""), assignment, 1)
    assert report["images"] == 700 and report["distinct_images"] == 574
    # clean: 48 pairs + 1 group of 4; faulty: 25 groups of 4 (the study's pitted_surface images).
    assert report["duplicate_groups"] == 74
    assert report["images_in_duplicate_groups"] == 48 * 2 + 4 + 25 * 4
    assert sum(report["counts"][side]["clean"] for side in SPLITS) == 100


def make_images(folder: Path, count: int, start: int = 0) -> None:
    for index in range(start, start + count):
        save_image(picture((8, 8), index), folder / f"img{index}.png")


def test_missing_data_folder_is_named(tmp_path: Path) -> None:
    message = rf"data folder .*nowhere \(params.yaml 'data\.dir'\) does not exist.*{re.escape(OWN_DATA_COMMAND)}"
    with pytest.raises(PipelineError, match=message):
        scan_dataset(tmp_path / "nowhere", "clean", "faulty")


def test_missing_class_folder_lists_what_is_there(tmp_path: Path) -> None:
    make_images(tmp_path / "fresh", 3)
    make_images(tmp_path / "faulty", 3, start=10)
    with pytest.raises(PipelineError, match=r"clean does not exist \(folders present: \['faulty', 'fresh'\]\).*negative_class"):
        scan_dataset(tmp_path, "clean", "faulty")


def test_empty_class_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "clean", 3)
    (tmp_path / "faulty").mkdir()
    (tmp_path / "faulty" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(PipelineError, match=r"faulty holds no readable images"):
        scan_dataset(tmp_path, "clean", "faulty")


def test_same_image_in_both_classes_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "clean", 3)
    make_images(tmp_path / "faulty", 3, start=2)
    with pytest.raises(PipelineError, match=r"both classes.*clean/img2\.png"):
        scan_dataset(tmp_path, "clean", "faulty")


def test_class_too_small_for_the_split_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "clean", 2)
    make_images(tmp_path / "faulty", 20, start=50)
    table = scan_dataset(tmp_path, "clean", "faulty")[0]
    with pytest.raises(PipelineError, match=r"label 0 has 2 images.*too few.*split\.test_ratio"):
        split(table, 0)
