"""Lay out the elpv solar-cell set (PyPI package elpv-dataset) as class folders the pipeline reads.

    python -m benchmarks.elpv_folders OUT_DIR [--rare] [--seed 0]

clean/ holds the cells with defect probability 0, faulty/ those with probability >= 2/3; the 1/3 cells are
left out as ambiguous. With --rare, faulty/ holds a seeded random 10 % as many faulty cells as there are
clean ones (a rare-defect set). The PNG files are copied byte for byte from the installed package (CC BY-NC-SA
4.0, never committed here). Then: dvc exp run -S data.dir=OUT_DIR (the class names are the defaults).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

FAULTY_FROM = 2 / 3
RARE_FAULTY_SHARE = 0.10

log = logging.getLogger("anomaly_pipeline.elpv")


def elpv_labels() -> tuple[Path, pd.DataFrame]:
    """The installed package's data folder and its labels (path, probability, type), one row per cell."""
    try:
        import elpv_dataset
    except ImportError as error:
        raise SystemExit("the elpv set comes from the PyPI package: pip install elpv-dataset==1.0.0.post1") from error
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    labels = pd.read_csv(data_dir / "labels.csv", sep=r"\s+", header=None, names=["path", "probability", "type"])
    return data_dir, labels


def class_lists(labels: pd.DataFrame, rare: bool, seed: int) -> dict[str, list[str]]:
    """Relative image paths per class folder: probability 0 -> clean, >= 2/3 -> faulty (a seeded 10 % of the
    clean count of them when ``rare``)."""
    clean = labels.loc[labels["probability"] == 0, "path"].tolist()
    faulty = labels.loc[labels["probability"] >= FAULTY_FROM - 1e-6, "path"].tolist()
    if rare:
        keep = round(RARE_FAULTY_SHARE * len(clean))
        chosen = np.random.default_rng(seed).choice(len(faulty), size=keep, replace=False)
        faulty = [faulty[index] for index in sorted(chosen)]
    return {"clean": clean, "faulty": faulty}


def write_folders(out_dir: Path, rare: bool = False, seed: int = 0) -> dict[str, int]:
    """Copy the chosen cells into OUT_DIR/clean and OUT_DIR/faulty (which must not exist yet); counts per class."""
    data_dir, labels = elpv_labels()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty: choose a new folder")
    counts = {}
    for name, paths in class_lists(labels, rare, seed).items():
        folder = out_dir / name
        folder.mkdir(parents=True)
        for relative in paths:
            shutil.copyfile(data_dir / relative, folder / Path(relative).name)
        counts[name] = len(paths)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rare", action="store_true", help="keep 10 %% as many faulty cells as clean ones")
    parser.add_argument("--seed", type=int, default=0, help="which faulty cells --rare keeps")
    args = parser.parse_args()
    counts = write_folders(args.out_dir, args.rare, args.seed)
    print(f"{args.out_dir}: {counts['clean']} clean, {counts['faulty']} faulty")


if __name__ == "__main__":
    main()
