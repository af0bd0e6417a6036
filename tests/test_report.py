"""The report and the console summary tell the truth about their data: decoder, reference figures, one run."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_pipeline.plots_page import PAGE_FILE, render
from anomaly_pipeline.report import _thumbnail, render_report
from anomaly_pipeline.summary import format_summary, headline, summarize
from tests.conftest import PROJECT

METRICS = ("test_accuracy", "test_balanced_accuracy", "test_precision", "test_recall", "test_f1",
           "test_specificity", "test_roc_auc", "train_accuracy", "epochs_run", "best_epoch", "run_seconds",
           "train_peak_rss_mb")


def one_run_table() -> pd.DataFrame:
    row = {"run": 0, "arch": "resnet18", "weights": "random-init", "weights_source": "random init", "finetune": "all", **{name: 0.75 for name in METRICS},
           "cm_tn": 3, "cm_fp": 1, "cm_fn": 1, "cm_tp": 3}
    return pd.DataFrame([row])


def decoded(data_uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))))


def test_thumbnail_of_a_16_bit_png_shows_the_image_not_a_white_square(tmp_path: Path) -> None:
    values = np.full((40, 40), 20000, dtype=np.uint16)  # about 30 % of the 16-bit range: a dark grey
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    pixels = decoded(_thumbnail(path))
    assert abs(float(pixels.mean()) - 20000 / 65535 * 255) < 3


def test_one_run_shows_no_nan() -> None:
    summary = summarize(one_run_table())
    text = format_summary(summary)
    assert "nan" not in text.lower() and "± –" in text
    assert headline(summary)["accuracy"] == 0.75


def test_study_figures_appear_only_beside_the_study_dataset() -> None:
    table = one_run_table()
    summary = summarize(table)
    history = pd.DataFrame({"run": [0, 0], "epoch": [1, 2], "val_loss": [0.7, 0.5], "train_loss": [0.8, 0.4]})
    roc = pd.DataFrame({"run": [0, 0], "fpr": [0, 1], "tpr": [0, 1]})
    pr = pd.DataFrame({"run": [0, 0], "recall": [0, 1], "precision": [1, 0.5]})
    wrong = pd.DataFrame(columns=["run", "path", "label", "score", "kind", "file", "heatmap"])
    pages = {study: render_report(summary, table, history, roc, pr, wrong, Path("images"), ("clean", "faulty"),
                                  study_dataset=study) for study in (True, False)}
    assert "study (reference)" in pages[True] and "95.43 %" in pages[True]
    assert "study (reference)" not in pages[False] and "95.43" not in pages[False]
    text = re.sub(r'src="data:[^"]*"', "", pages[False])  # the text, without the embedded images
    assert "over 1 run<" in text and "nan" not in text.lower()


def test_committed_plots_page_is_the_one_vl_convert_makes() -> None:
    page = (PROJECT / PAGE_FILE).read_text()
    assert page == render(), "run 'python -m anomaly_pipeline.plots_page' and commit .dvc/plots_page.html"
    assert "cdn." not in page and "{plot_divs}" in page
