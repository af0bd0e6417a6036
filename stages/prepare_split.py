"""prepare-split: write one run's train/val/test manifests (path, label, sha256); no image is copied.

The split is stratified per class and grouped by content: byte-identical images (same sha256)
always land on the same side, so no test image has a twin in training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import (
    SPLITS,
    Params,
    PipelineError,
    RunPaths,
    atomic_dir,
    list_images,
    load_params,
    main_guard,
    run_arg,
    run_seed,
    sha256_file,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger("anomaly_pipeline.prepare_split")


def scan_dataset(data_dir: Path, negative_class: str, positive_class: str) -> pd.DataFrame:
    """One row per image of the two class folders: path (relative to data_dir), label (1 = positive), sha256."""
    if not data_dir.is_dir():
        raise PipelineError(
            f"data folder {data_dir} does not exist: fetch the dataset with 'dvc repro --pull' "
            f"or point 'data.dir' in params.yaml at a folder with one subfolder per class"
        )
    rows = []
    for label, class_name in ((0, negative_class), (1, positive_class)):
        class_dir = data_dir / class_name
        if not class_dir.is_dir():
            present = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
            raise PipelineError(
                f"class folder {class_dir} does not exist (folders present: {present}); "
                f"set 'data.negative_class' / 'data.positive_class' in params.yaml to your class folder names"
            )
        images = list(list_images(class_dir))
        if not images:
            raise PipelineError(f"class folder {class_dir} holds no images: every class needs images to split")
        rows += [(image.relative_to(data_dir).as_posix(), label, sha256_file(image)) for image in images]
    table = pd.DataFrame(rows, columns=["path", "label", "sha256"])
    both = table.groupby("sha256")["label"].nunique()
    conflicting = table[table["sha256"].isin(both[both > 1].index)]
    if not conflicting.empty:
        raise PipelineError(
            "identical images appear in both classes, so their label is ambiguous: "
            + ", ".join(conflicting["path"].head(10)) + "; remove the wrong copies"
        )
    return table


def split_groups(
    table: pd.DataFrame, test_ratio: float, val_ratio: float, rng: np.random.Generator
) -> pd.Series:
    """Assign every image to train/val/test, per class, moving whole sha256 groups together."""
    assignment = pd.Series("", index=table.index, dtype=object)
    for label, images in table.groupby("label"):
        groups = images.groupby("sha256").size().sort_index()
        order = groups.index[rng.permutation(len(groups))]
        test_target = round(len(images) * test_ratio)
        val_target = round((len(images) - test_target) * val_ratio)
        counts = {"test": 0, "val": 0}
        for sha in order:
            side = "test" if counts["test"] < test_target else "val" if counts["val"] < val_target else "train"
            if side in counts:
                counts[side] += int(groups[sha])
            assignment[images.index[images["sha256"] == sha]] = side
        taken = assignment[images.index].value_counts()
        missing = [split for split in SPLITS if taken.get(split, 0) == 0]
        if missing:
            raise PipelineError(
                f"class label {label} has {len(images)} images in {len(groups)} distinct groups, too few to "
                f"give {', '.join(missing)} at least one image with split.test_ratio={test_ratio} and "
                f"split.val_ratio={val_ratio}; add images or change the ratios"
            )
    return assignment


def split_report(table: pd.DataFrame, assignment: pd.Series, seed: int) -> dict:
    """Counts per split and class, and the duplicates that were kept together."""
    group_sizes = table.groupby("sha256").size()
    counts = {
        split: {
            "clean": int(((assignment == split) & (table["label"] == 0)).sum()),
            "faulty": int(((assignment == split) & (table["label"] == 1)).sum()),
        }
        for split in SPLITS
    }
    return {
        "seed": seed,
        "images": len(table),
        "distinct_images": int(len(group_sizes)),
        "duplicate_groups": int((group_sizes > 1).sum()),
        "images_in_duplicate_groups": int(group_sizes[group_sizes > 1].sum()),
        "counts": counts,
    }


def main() -> None:
    params: Params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    paths = RunPaths(run)
    seed = run_seed(params.seed, run)
    table = scan_dataset(params.data.dir, params.data.negative_class, params.data.positive_class)
    assignment = split_groups(table, params.split.test_ratio, params.split.val_ratio, np.random.default_rng(seed))
    report = split_report(table, assignment, seed)
    with atomic_dir(paths.split_dir) as out:
        for split in SPLITS:
            write_csv_atomic(out / f"{split}.csv", table[assignment == split].sort_values("path"))
        write_json_atomic(out / "report.json", report)
    log.info(
        "run %d: %d images (%d distinct, %d duplicate groups kept on one side); train %s, val %s, test %s",
        run, report["images"], report["distinct_images"], report["duplicate_groups"],
        *(report["counts"][split] for split in SPLITS),
    )


if __name__ == "__main__":
    main_guard(main)
