"""evaluate: score one run's best model on its test (and train) images and write the run's metrics.

Misclassified test images are copied into false_positives/ and false_negatives/, each with its Grad-CAM heatmap.
"""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from tqdm import tqdm

from stages.common import (
    RunPaths,
    atomic_dir,
    load_images,
    load_params,
    load_trained_model,
    main_guard,
    misclassified_copy,
    peak_rss_mb,
    predict_scores,
    read_json,
    read_manifest,
    resolve_device,
    run_arg,
    write_csv_atomic,
    write_json_atomic,
)
from stages.explain import grad_cam, heatmap_path, overlay

log = logging.getLogger("anomaly_pipeline.evaluate")


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """Binary metrics (positive class = 1 = faulty) from true labels and positive-class probabilities."""
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": accuracy_score(labels, predicted),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted) if both_classes else None,
        "precision": precision_score(labels, predicted, pos_label=1, zero_division=0),
        "recall": recall_score(labels, predicted, pos_label=1, zero_division=0),
        "f1": f1_score(labels, predicted, pos_label=1, zero_division=0),
        "specificity": recall_score(labels, predicted, pos_label=0, zero_division=0),
        "roc_auc": roc_auc_score(labels, scores) if both_classes else None,
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def main() -> None:
    params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    paths = RunPaths(run)
    device = resolve_device(params.device)
    started = time.perf_counter()
    trained = load_trained_model(paths.model_file, device)
    model, size = trained.network, trained.image_size
    threshold = params.evaluate.threshold

    def score(split: str) -> tuple[pd.DataFrame, torch.Tensor, np.ndarray]:
        manifest = read_manifest(paths.manifest(split))
        images = load_images(params.data.dir, manifest["path"].tolist(), size)
        return manifest, images, predict_scores(model, images, params.evaluate.batch_size, device)

    train_manifest, _, train_scores = score("train")
    test_manifest, test_images, test_scores = score("test")
    test = classification_metrics(test_manifest["label"].to_numpy(), test_scores, threshold)
    train_accuracy = accuracy_score(train_manifest["label"], (train_scores >= threshold).astype(int))
    predictions = test_manifest.assign(
        score=np.round(test_scores, 6), predicted=(test_scores >= threshold).astype(int)
    )
    with atomic_dir(paths.eval_dir) as out:
        write_csv_atomic(out / "predictions.csv", predictions)
        for folder in ("false_positives", "false_negatives"):
            (out / folder).mkdir()
        wrong = np.flatnonzero(predictions["label"] != predictions["predicted"])
        for position in tqdm(wrong, desc="grad-cam", unit="img", leave=False, disable=None):
            row = predictions.iloc[position]
            copy = misclassified_copy(out, row.path, row.label)
            shutil.copy2(params.data.dir / row.path, copy)
            cam = grad_cam(model, test_images[position], int(row.predicted), device)
            overlay(copy, cam).save(heatmap_path(copy))
    evaluate_seconds = time.perf_counter() - started
    train_summary = read_json(paths.train_summary_file)
    metrics = {
        "run": run,
        "train_accuracy": train_accuracy,
        **{f"test_{name}": value for name, value in test.items() if name != "confusion_matrix"},
        "confusion_matrix": test["confusion_matrix"],
        "test_images": len(test_manifest),
        **{key: value for key, value in train_summary.items() if key not in ("weights", "device")},
        "evaluate_seconds": round(evaluate_seconds, 2),
        "evaluate_peak_rss_mb": round(peak_rss_mb(), 1),
        "pretrained": train_summary["weights"] == "imagenet",
    }
    metrics = {key: round(value, 6) if isinstance(value, float) else value for key, value in metrics.items()}
    write_json_atomic(paths.metrics_file, metrics)
    cm = test["confusion_matrix"]
    log.info("run %d: test accuracy %.4f, balanced %.4f, precision %.4f, recall %.4f (TN %d FP %d FN %d TP %d)",
             run, test["accuracy"], test["balanced_accuracy"] or float("nan"), test["precision"], test["recall"],
             cm["tn"], cm["fp"], cm["fn"], cm["tp"])


if __name__ == "__main__":
    main_guard(main)
