"""Splitting a dataset for one run: stratified per class and grouped, so no test image has a copy in training.

Byte-identical images (same sha256), and images whose file names share a ``split.group_pattern`` key, always
land on the same side. Unreadable files are skipped with a warning (or stop the run with ``data.strict``);
near-identical train/test pairs are reported.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import train_test_split

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.files import sha256_file
from anomaly_pipeline.images import class_dirs, list_folder, open_rgb
from anomaly_pipeline.layout import MANIFEST_COLUMNS, SPLITS
from anomaly_pipeline.params import Params, run_seed

log = logging.getLogger("anomaly_pipeline.prepare_split")
EXAMPLES = 10
THUMB = 32
NEAR_DUPLICATE_BLOCK = 256


def thumbnail(image: Image.Image) -> np.ndarray:
    """A 32x32 greyscale thumbnail, flattened (float32): the image's fingerprint for near-duplicate checks."""
    return np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.float32).ravel()


def _listing(paths: list[Path], data_dir: Path) -> str:
    shown = ", ".join(p.relative_to(data_dir).as_posix() for p in paths[:EXAMPLES])
    return shown + (f" and {len(paths) - EXAMPLES} more" if len(paths) > EXAMPLES else "")


def scan_dataset(data_dir: Path, negative_class: str, positive_class: str,
                 strict: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """Read every image of the two class folders.

    Returns one row per readable image (path relative to data_dir, label 1 = positive, sha256, thumbnail),
    and the skipped unreadable files with their reasons. Missing or empty classes, and identical images
    in both classes, raise PipelineError; so do unreadable files when ``strict``.
    """
    class_folders = class_dirs(data_dir, negative_class, positive_class)
    extra = [p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p not in class_folders]
    if extra:
        log.warning("ignoring folders of %s that are not class folders: %s", data_dir, ", ".join(sorted(extra)))
    rows, skipped = [], []
    for label, class_dir in enumerate(class_folders):
        listing = list_folder(class_dir)
        if listing.others:
            log.warning("ignoring %d files of %s that are not images by their extension: %s",
                        len(listing.others), class_dir, _listing(listing.others, data_dir))
        for path in listing.images:
            try:
                fingerprint = thumbnail(open_rgb(path))
            except PipelineError as error:
                skipped.append({"path": path.relative_to(data_dir).as_posix(), "reason": str(error)})
                continue
            rows.append((path.relative_to(data_dir).as_posix(), label, sha256_file(path), fingerprint))
    if skipped:
        listed = "\n  ".join(item["reason"] for item in skipped)
        if strict:
            raise PipelineError(f"{len(skipped)} unreadable image files (data.strict is true); remove or "
                                f"replace them, or set 'data.strict: false' to skip them:\n  {listed}")
        log.warning("skipping %d unreadable image files (set 'data.strict: true' to stop instead):\n  %s",
                    len(skipped), listed)
    table = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "thumbnail"])
    for label, class_name in ((0, negative_class), (1, positive_class)):
        if not (table["label"] == label).any():
            raise PipelineError(f"class folder {data_dir / class_name} holds no readable images: "
                                f"every class needs images to split")
    both = table.groupby("sha256")["label"].nunique()
    conflicting = table[table["sha256"].isin(both[both > 1].index)]
    if not conflicting.empty:
        raise PipelineError(
            "identical images appear in both classes, so their label is ambiguous: "
            + ", ".join(conflicting["path"].head(EXAMPLES)) + "; remove the wrong copies"
        )
    return table, skipped


def group_ids(table: pd.DataFrame, pattern: str) -> pd.Series:
    """A group number per image: images sharing a sha256, or (within a class) a ``pattern`` key of their file name."""
    parent = list(range(len(table)))

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    keys = [table["sha256"]]
    if pattern:
        regex = re.compile(pattern)

        def key(path: str) -> str | None:
            match = regex.search(Path(path).name)
            return None if match is None else match.group(1) if regex.groups else match.group(0)

        keys.append(table["path"].map(key).radd(table["label"].astype(str) + ":"))
    for column in keys:
        for members in pd.Series(range(len(table))).groupby(column.to_numpy(), dropna=True):
            first, *rest = members[1].tolist()
            for other in rest:
                parent[find(other)] = find(first)
    roots = [find(node) for node in range(len(table))]
    return pd.Series(pd.factorize(pd.Series(roots))[0], index=table.index)


def split_groups(table: pd.DataFrame, groups: pd.Series, test_ratio: float, val_ratio: float,
                 rng: np.random.Generator) -> pd.Series:
    """Assign every image to train/val/test, per class, moving whole groups together."""
    assignment = pd.Series("", index=table.index, dtype=object)
    for label, images in table.groupby("label"):
        # Groups in content order (smallest sha256 of each), so a split depends on the images, not their names.
        members = images.groupby(groups[images.index])["sha256"]
        sizes = members.size()[members.min().sort_values().index]
        order = sizes.index[rng.permutation(len(sizes))]
        test_target = round(len(images) * test_ratio)
        val_target = round((len(images) - test_target) * val_ratio)
        counts = {"test": 0, "val": 0}
        for group in order:
            side = "test" if counts["test"] < test_target else "val" if counts["val"] < val_target else "train"
            if side in counts:
                counts[side] += int(sizes[group])
            assignment[images.index[groups[images.index] == group]] = side
        taken = assignment[images.index].value_counts()
        missing = [split for split in SPLITS if taken.get(split, 0) == 0]
        if missing:
            raise PipelineError(
                f"class label {label} has {len(images)} images in {len(sizes)} distinct groups, too few to "
                f"give {', '.join(missing)} at least one image with split.test_ratio={test_ratio} and "
                f"split.val_ratio={val_ratio}; add images or change the ratios"
            )
    return assignment


def naive_split_leakage(table: pd.DataFrame, test_ratio: float, seed: int) -> int:
    """How many test images of a plain stratified random split (the study's) have a byte-identical twin in training."""
    train, test = train_test_split(table, test_size=test_ratio, stratify=table["label"], random_state=seed % 2**32)
    return int(test["sha256"].isin(set(train["sha256"])).sum())


def near_duplicates(table: pd.DataFrame, assignment: pd.Series, max_rms: float) -> list[dict]:
    """Test/train pairs of different files whose thumbnails differ by at most ``max_rms`` grey levels (RMS)."""
    if max_rms <= 0:
        return []
    test, train = table[assignment == "test"], table[assignment == "train"]
    b = np.stack(train["thumbnail"]).astype(np.float64)
    b_squared = (b**2).sum(1)[None, :]
    pairs = []
    # A block of test images at a time: the whole test x train distance matrix would take gigabytes at 20,000.
    for start in range(0, len(test), NEAR_DUPLICATE_BLOCK):
        a = np.stack(test["thumbnail"].iloc[start:start + NEAR_DUPLICATE_BLOCK]).astype(np.float64)
        rms = np.sqrt(np.maximum((a**2).sum(1)[:, None] + b_squared - 2 * a @ b.T, 0) / a.shape[1])
        pairs += [{"test": test["path"].iloc[start + i], "train": train["path"].iloc[j],
                   "rms": round(float(rms[i, j]), 3)} for i, j in zip(*np.nonzero(rms <= max_rms))]
    return sorted(pairs, key=lambda pair: (pair["rms"], pair["test"]))


def split_report(table: pd.DataFrame, groups: pd.Series, assignment: pd.Series, seed: int) -> dict:
    """Counts per split and class, and the groups of identical images that were kept together."""
    sizes = table.groupby("sha256")["path"].apply(list)
    duplicates = sizes[sizes.map(len) > 1]
    return {
        "seed": seed,
        "images": len(table),
        "distinct_images": int(len(sizes)),
        "groups": int(groups.nunique()),
        "duplicate_groups": int(len(duplicates)),
        "images_in_duplicate_groups": int(duplicates.map(len).sum()),
        "counts": {
            split: {
                "clean": int(((assignment == split) & (table["label"] == 0)).sum()),
                "faulty": int(((assignment == split) & (table["label"] == 1)).sum()),
            }
            for split in SPLITS
        },
        "duplicates": sorted(duplicates.tolist()),
    }


def make_split(params: Params, run: int) -> tuple[dict[str, pd.DataFrame], dict]:
    """One run's split of data.dir: a manifest (path, label, sha256; sorted by path) per split, and its report."""
    seed = run_seed(params.seed, run)
    table, skipped = scan_dataset(params.data.dir, params.data.negative_class, params.data.positive_class,
                                  params.data.strict)
    groups = group_ids(table, params.split.group_pattern)
    assignment = split_groups(table, groups, params.split.test_ratio, params.split.val_ratio,
                              np.random.default_rng(seed))
    report = split_report(table, groups, assignment, seed) | {
        "naive_split_test_images_with_train_twin": naive_split_leakage(table, params.split.test_ratio, seed),
        "near_duplicates_train_test": near_duplicates(table, assignment, params.split.near_duplicate_rms),
        "skipped_unreadable": skipped,
    }
    manifests = {split: table.loc[assignment == split, MANIFEST_COLUMNS].sort_values("path") for split in SPLITS}
    return manifests, report
