"""aggregate: average the runs' metrics into metrics/summary.json and tabulate them in metrics/runs.csv."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from stages.common import (
    PipelineError,
    RunPaths,
    load_params,
    main_guard,
    read_json,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger("anomaly_pipeline.aggregate")

SUMMARY_FILE = Path("metrics/summary.json")
RUNS_TABLE_FILE = Path("metrics/runs.csv")
HEADLINE = ("test_accuracy", "test_balanced_accuracy", "test_precision", "test_recall", "test_f1",
            "train_accuracy", "train_seconds", "train_peak_rss_mb")


def runs_table(runs: tuple[int, ...]) -> pd.DataFrame:
    """One row per run, the confusion matrix flattened into cm_tn, cm_fp, cm_fn, cm_tp."""
    rows = []
    for run in runs:
        path = RunPaths(run).metrics_file
        if not path.is_file():
            raise PipelineError(f"metrics of run {run} ({path}) are missing: run 'dvc repro' to evaluate it")
        metrics = read_json(path)
        matrix = metrics.pop("confusion_matrix")
        rows.append({**metrics, **{f"cm_{cell}": count for cell, count in matrix.items()}})
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame) -> dict:
    """Mean, standard deviation (n-1), min and max of every numeric metric over the runs."""
    numeric = table.drop(columns=["run", "pretrained"]).select_dtypes("number")
    stats = numeric.agg(["mean", "std", "min", "max"]).round(6)
    summary: dict = {
        "runs": len(table),
        "weights": "imagenet" if table["pretrained"].all() else "random-init" if not table["pretrained"].any() else "mixed",
    }
    for column in numeric.columns:
        if column.startswith("cm_"):
            continue
        summary[column] = {stat: (None if pd.isna(value) else float(value)) for stat, value in stats[column].items()}
    summary["confusion_matrix_mean"] = {
        column[3:]: float(stats.loc["mean", column]) for column in numeric.columns if column.startswith("cm_")
    }
    return summary


def format_summary(summary: dict) -> str:
    """The headline metrics as a small text table (mean ± std, min–max)."""
    lines = [f"{summary['runs']} runs, {summary['weights']} weights", f"{'metric':<24}{'mean ± std':>22}{'min – max':>24}"]
    for name in HEADLINE:
        stats = summary[name]
        std = stats["std"] if stats["std"] is not None else float("nan")
        lines.append(f"{name:<24}{stats['mean']:>12.4f} ± {std:<8.4f}{stats['min']:>11.4f} – {stats['max']:<10.4f}")
    return "\n".join(lines)


def main() -> None:
    params = load_params()
    table = runs_table(params.runs)
    summary = summarize(table)
    write_csv_atomic(RUNS_TABLE_FILE, table)
    write_json_atomic(SUMMARY_FILE, summary)
    log.info("summary over runs %s:\n%s", list(params.runs), format_summary(summary))


if __name__ == "__main__":
    main_guard(main)
