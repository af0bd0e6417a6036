"""Averaging the runs: the per-run table, mean/std/min/max of every metric, the headline, the console table and
the data of the plots."""

from __future__ import annotations

import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.files import read_json
from anomaly_pipeline.layout import EvalFiles, RunPaths

# metrics/headline.json: name -> per-run metric whose mean it is (test set, faulty = positive).
HEADLINE_METRICS = {"accuracy": "test_accuracy", "balanced_accuracy": "test_balanced_accuracy",
                    "precision": "test_precision", "recall": "test_recall", "f1": "test_f1", "roc_auc": "test_roc_auc"}
CONSOLE_ROWS = ("test_accuracy", "test_balanced_accuracy", "test_precision", "test_recall", "test_f1",
                "test_average_precision", "threshold", "train_accuracy", "run_seconds", "train_peak_rss_mb")


def runs_table(runs: list[int]) -> pd.DataFrame:
    """One row per run, the confusion matrix flattened into cm_tn, cm_fp, cm_fn, cm_tp; run_seconds added."""
    rows = []
    for run in runs:
        path = RunPaths(run).metrics_file
        if not path.is_file():
            raise PipelineError(f"metrics of run {run} ({path}) are missing: run 'dvc repro' to evaluate it")
        metrics = read_json(path)
        matrix = metrics.pop("confusion_matrix")
        rows.append({**metrics, **{f"cm_{cell}": count for cell, count in matrix.items()}})
    table = pd.DataFrame(rows)
    return table.assign(run_seconds=(table["train_seconds"] + table["evaluate_seconds"]).round(2))


def summarize(table: pd.DataFrame) -> dict:
    """Mean, standard deviation (n-1), min and max of every numeric metric over the runs."""
    numeric = table.drop(columns=["run"]).select_dtypes("number")
    stats = numeric.agg(["mean", "std", "min", "max"]).round(6)
    summary: dict = {
        "runs": len(table),
        **{column: table[column].iloc[0] if table[column].nunique() == 1 else "mixed"
           for column in ("arch", "weights", "weights_source")},
        "finetune": "/".join(sorted(table["finetune"].unique())),
    }
    for column in numeric.columns:
        if column.startswith("cm_"):
            continue
        summary[column] = {stat: (None if pd.isna(value) else float(value)) for stat, value in stats[column].items()}
    summary["confusion_matrix_mean"] = {
        column[3:]: float(stats.loc["mean", column]) for column in numeric.columns if column.startswith("cm_")
    }
    return summary


def headline(summary: dict) -> dict:
    """The six headline means (4 decimals; None where a metric is undefined, e.g. ROC-AUC on one class)."""
    means = {name: summary[column]["mean"] for name, column in HEADLINE_METRICS.items()}
    return {name: None if value is None else round(value, 4) for name, value in means.items()}


def format_summary(summary: dict) -> str:
    """The headline metrics as a small text table (mean ± std, min – max; std shown as – for a single run)."""
    lines = [f"{summary['runs']} runs, {summary['arch']}, {summary['weights_source']} weights, finetune "
             f"{summary['finetune']}",
             f"{'metric':<24}{'mean ± std':>22}{'min – max':>24}"]
    for name in (row for row in CONSOLE_ROWS if row in summary):
        stats = summary[name]
        std = "–" if stats["std"] is None else f"{stats['std']:.4f}"
        lines.append(f"{name:<24}{stats['mean']:>12.4f} ± {std:<8}{stats['min']:>11.4f} – {stats['max']:<10.4f}")
    return "\n".join(lines)


def per_run_frames(runs: list[int], class_names: tuple[str, str]) -> tuple[pd.DataFrame, ...]:
    """All runs' test predictions, training histories, ROC and precision-recall curves, misclassified images."""
    predictions, histories, roc, pr, wrong = [], [], [], [], []
    for run in runs:
        paths = RunPaths(run)
        scored = pd.read_csv(paths.eval.predictions)
        predictions.append(scored.assign(run=run))
        histories.append(pd.read_csv(paths.model.history).assign(run=run))
        if scored["label"].nunique() == 2:
            fpr, tpr, _ = roc_curve(scored["label"], scored["score"])
            roc.append(pd.DataFrame({"run": run, "fpr": fpr, "tpr": tpr}))
            precision, recall, _ = precision_recall_curve(scored["label"], scored["score"])
            pr.append(pd.DataFrame({"run": run, "recall": recall, "precision": precision}))
        for row in scored[scored["label"] != scored["predicted"]].itertuples(index=False):
            copy = paths.eval.misclassified_copy(row.path, row.label)
            heatmap = EvalFiles.heatmap(copy)
            wrong.append({"run": run, "path": row.path, "label": row.label, "score": row.score,
                          "kind": "false positive" if row.label == 0 else "false negative",
                          "file": str(copy), "heatmap": str(heatmap) if heatmap.is_file() else ""})
    names = {0: class_names[0], 1: class_names[1]}
    all_predictions = pd.concat(predictions, ignore_index=True)
    all_predictions = all_predictions.assign(label=all_predictions["label"].map(names),
                                             predicted=all_predictions["predicted"].map(names))
    columns = ["run", "path", "label", "score", "kind", "file", "heatmap"]
    return (all_predictions[["run", "path", "label", "predicted", "score"]],
            pd.concat(histories, ignore_index=True), pd.concat(roc or [pd.DataFrame(columns=["run", "fpr", "tpr"])]),
            pd.concat(pr or [pd.DataFrame(columns=["run", "recall", "precision"])]),
            pd.DataFrame(wrong, columns=columns).sort_values(["kind", "run", "path"]))
