"""The benchmarks' own bookkeeping: which test images several recorded runs missed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks.bench_unseen_sets import recurring_misses


def kept_run(folder: Path, run: int, paths: list[str], labels: list[int], scores: list[float],
             threshold: float) -> dict:
    """A recorded run as bench_unseen_sets writes it, with its kept predictions (paths in the recorded order)."""
    (folder / "eval").mkdir(parents=True)
    pd.DataFrame({"path": paths, "label": labels, "score": scores}).to_csv(folder / "eval" / "predictions.csv",
                                                                           index=False)
    return {"set": "fruit", "config": "lite0", "run": run, "threshold": threshold, "kept": str(folder),
            "scores": {"test": {"label": labels, "score": scores}}}


def test_recurring_misses_counts_each_image_at_each_runs_own_threshold(tmp_path: Path) -> None:
    # run 0 (threshold 0.5) misses the peeled orange and the mouldy one; run 1 (threshold 0.2) misses the orange
    # only: 0.3 is faulty at its threshold. The apple is never missed.
    runs = [
        kept_run(tmp_path / "run-0", 0, ["fresh/orange.jpg", "rotten/mould.jpg", "fresh/apple.jpg"], [0, 1, 0],
                 [0.9, 0.3, 0.1], 0.5),
        kept_run(tmp_path / "run-1", 1, ["rotten/mould.jpg", "fresh/orange.jpg"], [1, 0], [0.3, 0.8], 0.2),
    ]
    listing = recurring_misses({("fruit", "lite0"): runs}, ["fruit"], ["lite0"]).splitlines()
    assert listing == [
        "fruit: 3 misclassifications in 2 runs (lite0), 2 of them on 1 images missed more than once",
        "  missed 2 of 2 times  fresh/orange.jpg",
    ]


def test_recurring_misses_refuses_a_kept_run_that_is_not_the_recorded_one(tmp_path: Path) -> None:
    run = kept_run(tmp_path / "run-0", 0, ["fresh/orange.jpg", "rotten/mould.jpg"], [0, 1], [0.9, 0.3], 0.5)
    run["scores"]["test"]["score"] = [0.1, 0.3]  # the folder was measured again after this record
    with pytest.raises(SystemExit, match="run-0: its predictions do not match the recorded run"):
        recurring_misses({("fruit", "lite0"): [run]}, ["fruit"], ["lite0"])
