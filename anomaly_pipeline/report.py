"""The human report of the aggregate stage: one self-contained HTML page (charts and images embedded)."""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from anomaly_pipeline.images import open_rgb  # noqa: E402
from anomaly_pipeline.params import IMAGENET  # noqa: E402

# The published study's own figures (mean over its 10 runs), shown beside ours.
STUDY = {
    "test_accuracy": 0.9543,
    "test_precision": 0.9896,
    "test_recall": 0.9567,
    "run_seconds": 397.0,
    "train_peak_rss_mb": 1112.0,
}
SUMMARY_ROWS = (
    ("test_accuracy", "Test accuracy", "pct"),
    ("test_balanced_accuracy", "Test balanced accuracy", "pct"),
    ("test_precision", "Precision (faulty)", "pct"),
    ("test_recall", "Recall (faulty)", "pct"),
    ("test_f1", "F1 (faulty)", "pct"),
    ("test_specificity", "Specificity (clean)", "pct"),
    ("test_roc_auc", "ROC-AUC", "num"),
    ("test_average_precision", "PR-AUC (average precision)", "num"),
    ("test_specificity_at_recall_95", "Specificity at 95 % recall", "pct"),
    ("test_recall_at_specificity_95", "Recall at 95 % specificity", "pct"),
    ("threshold", "Decision threshold (faulty probability)", "num"),
    ("train_accuracy", "Train accuracy", "pct"),
    ("epochs_run", "Epochs run", "num"),
    ("best_epoch", "Best epoch", "num"),
    ("run_seconds", "Seconds per run (train + evaluate)", "sec"),
    ("train_peak_rss_mb", "Peak RSS while training (MB)", "int"),
)
RUN_COLUMNS = {  # column of metrics/runs.csv -> (heading, format)
    "run": ("run", "int"), "test_accuracy": ("accuracy", "pct"), "test_balanced_accuracy": ("balanced", "pct"),
    "test_precision": ("precision", "pct"), "test_recall": ("recall", "pct"), "test_f1": ("F1", "pct"),
    "test_roc_auc": ("ROC-AUC", "num"), "test_average_precision": ("PR-AUC", "num"),
    "threshold": ("threshold", "num"), "cm_tn": ("TN", "int"), "cm_fp": ("FP", "int"), "cm_fn": ("FN", "int"),
    "cm_tp": ("TP", "int"), "train_accuracy": ("train acc.", "pct"), "epochs_run": ("epochs", "int"),
    "best_epoch": ("best", "int"), "run_seconds": ("time", "sec"), "train_peak_rss_mb": ("RSS MB", "int"),
}
THUMBNAIL = 112
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 12px;border-bottom:2px solid #dde1e8;padding-bottom:6px}
.sub{color:#5b6475;margin:0 0 18px}.cards{display:flex;gap:14px;flex-wrap:wrap}
.card{background:#fff;border-radius:10px;padding:14px 18px;box-shadow:0 1px 3px #0001;min-width:150px}
.card b{display:block;font-size:24px}.card span{color:#5b6475;font-size:13px}
table{border-collapse:collapse;background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 3px #0001;font-size:14px}
th,td{padding:7px 12px;text-align:right;border-bottom:1px solid #eceef2;white-space:nowrap}th{background:#eef1f6;font-weight:600}
td:first-child,th:first-child{text-align:left}tr:last-child td{border-bottom:none}
.note{color:#5b6475;font-size:13px;max-width:900px}.warn{background:#fff4e0;border-left:4px solid #f0a020;padding:10px 14px;border-radius:6px}
.cm td{width:110px;text-align:center;font-size:16px}.cm .good{background:#e3f4e8}.cm .bad{background:#fbe4e4}
.charts{display:grid;grid-template-columns:1fr 1fr;gap:16px}.charts img{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0001;width:100%}
.wide{overflow-x:auto}
.sheet{display:flex;flex-wrap:wrap;gap:10px}.sheet figure{margin:0;background:#fff;border-radius:8px;padding:6px;
box-shadow:0 1px 3px #0001;width:min-content;min-width:112px;font-size:11px}.sheet img{width:112px;height:112px;object-fit:cover;border-radius:4px;margin-right:4px}
.sheet figcaption{margin-top:4px;line-height:1.35;word-break:break-all}.tag{font-weight:600}.fp{color:#b3261e}.fn{color:#8a5a00}
"""


def _format(value: float | None, kind: str) -> str:
    if value is None or pd.isna(value):
        return "–"
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "sec":
        return f"{value:.0f} s"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _line_chart(frame: pd.DataFrame, x: str, y: str, title: str, xlabel: str, ylabel: str,
                diagonal: bool = False, log_y: bool = False) -> str:
    figure, axes = plt.subplots(figsize=(4.6, 3.5))
    for run, rows in frame.groupby("run"):
        axes.plot(rows[x], rows[y], label=f"run {run}", linewidth=1.4, drawstyle="default")
    if diagonal:
        axes.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
    if log_y:
        axes.set_yscale("log")
    if x == "epoch":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2, frameon=False)
    return _png(figure)


def _thumbnail(path: Path) -> str:
    """The image as training saw it (the pipeline's decoder: 16-bit, palette, CMYK, transparency), as a small JPEG."""
    image = open_rgb(path)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _runs_table(runs: pd.DataFrame) -> str:
    columns = [column for column in RUN_COLUMNS if column in runs.columns]
    head = "".join(f"<th>{RUN_COLUMNS[column][0]}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_format(row[column], RUN_COLUMNS[column][1])}</td>" for column in columns) + "</tr>"
        for _, row in runs.iterrows()
    )
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


def render_report(summary: dict, runs: pd.DataFrame, history: pd.DataFrame, roc: pd.DataFrame,
                  precision_recall: pd.DataFrame, misclassified: pd.DataFrame, data_dir: Path,
                  class_names: tuple[str, str], study_dataset: bool) -> str:
    """The whole report as an HTML string; the study's published figures are shown only when ``study_dataset``.

    ``misclassified`` has columns run, path, label, score, kind ("false positive"/"false negative"), file and
    heatmap (the Grad-CAM overlay's path, or "").
    """
    clean, faulty = (html.escape(name) for name in class_names)
    run_count = f"{summary['runs']} run{'' if summary['runs'] == 1 else 's'}"
    cards = "".join(
        f'<div class="card"><b>{_format(summary[key]["mean"], kind)}</b><span>{label}<br>± '
        f'{_format(summary[key]["std"], kind)} over {run_count}</span></div>'
        for key, label, kind in (("test_accuracy", "test accuracy", "pct"),
                                 ("test_balanced_accuracy", "balanced accuracy", "pct"),
                                 ("test_precision", "precision", "pct"), ("test_recall", "recall", "pct"))
    )
    summary_rows = "".join(
        f"<tr><td>{label}</td><td>{_format(summary[key]['mean'], kind)}</td><td>{_format(summary[key]['std'], kind)}</td>"
        f"<td>{_format(summary[key]['min'], kind)}</td><td>{_format(summary[key]['max'], kind)}</td>"
        + (f"<td>{_format(STUDY.get(key), kind)}</td>" if study_dataset else "") + "</tr>"
        for key, label, kind in SUMMARY_ROWS if key in summary
    )
    study_heading = "<th>study (reference)</th>" if study_dataset else ""
    study_note = ("The study's figures are its published means (ImageNet weights, a split that leaks duplicates)."
                  if study_dataset else "The study's published figures are not shown: they belong to its own "
                  "metal-surface dataset, not to these images.")
    matrix = summary["confusion_matrix_mean"]
    confusion = (
        f'<table class="cm"><tr><th>true \\ predicted</th><th>{clean}</th><th>{faulty}</th></tr>'
        f'<tr><th>{clean}</th><td class="good">{matrix["tn"]:.1f}</td><td class="bad">{matrix["fp"]:.1f}</td></tr>'
        f'<tr><th>{faulty}</th><td class="bad">{matrix["fn"]:.1f}</td><td class="good">{matrix["tp"]:.1f}</td></tr></table>'
    )
    charts = "".join(f'<img alt="{alt}" src="{src}">' for alt, src in (
        ("validation loss per epoch", _line_chart(history, "epoch", "val_loss", "Validation loss", "epoch",
                                                  "cross-entropy", log_y=True)),
        ("training loss per epoch", _line_chart(history, "epoch", "train_loss", "Training loss", "epoch",
                                                "cross-entropy", log_y=True)),
        ("ROC curves", _line_chart(roc, "fpr", "tpr", f"ROC ({faulty} positive)", "false positive rate",
                                   "true positive rate", diagonal=True)),
        ("precision-recall curves", _line_chart(precision_recall, "recall", "precision",
                                                "Precision–recall", "recall", "precision")),
    ))
    figures = "".join(
        f'<figure><img alt="{html.escape(row.path)}" src="{_thumbnail(Path(row.file))}">'
        + (f'<img alt="Grad-CAM of {html.escape(row.path)}" src="{_thumbnail(Path(row.heatmap))}">' if row.heatmap else "")
        + f'<figcaption>'
        f'<span class="tag {"fp" if row.kind == "false positive" else "fn"}">{row.kind}</span><br>'
        f'run {row.run} · score {row.score:.3f}<br>{html.escape(row.path)}</figcaption></figure>'
        for row in misclassified.itertuples(index=False)
    ) or "<p>No test image was misclassified.</p>"
    weights_note = ("" if summary["weights"] == IMAGENET else
                    f'<p class="warn">These runs used <b>{html.escape(summary["weights"])}</b> weights, not ImageNet '
                    f"weights as in the study: compare with care.</p>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>anomaly-pipeline report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body><main>
<h1>{clean} vs {faulty}: {run_count}</h1>
<p class="sub">data <code>{html.escape(str(data_dir))}</code> · {html.escape(summary["arch"])} · {html.escape(summary["weights_source"])} weights · written {stamp}</p>
{weights_note}
<div class="cards">{cards}</div>
<h2>Summary over runs</h2>
<table><tr><th>metric</th><th>mean</th><th>std</th><th>min</th><th>max</th>{study_heading}</tr>{summary_rows}</table>
<p class="note">Positive class: {faulty}. Precision, recall and F1 are those of the {faulty} class; specificity is the
recall of the {clean} class. On an imbalanced test set read balanced accuracy and recall beside accuracy.
{study_note}</p>
<h2>Mean confusion matrix (test)</h2>{confusion}
<h2>Curves</h2><div class="charts">{charts}</div>
<h2>Runs</h2>{_runs_table(runs)}
<h2>Misclassified test images ({len(misclassified)})</h2>
<p class="note">Each image beside its Grad-CAM heatmap: red marks where the network's last block found the
evidence for the class it (wrongly) chose.</p><div class="sheet">{figures}</div>
</main></body></html>
"""
