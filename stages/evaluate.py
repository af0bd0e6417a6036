"""evaluate: score one run's best model on its test (and train) images and write the run's metrics.

Misclassified test images are copied into false_positives/ and false_negatives/, each with its Grad-CAM heatmap.
A model trained on frozen features (train.finetune layer4 or head) is scored from the same cached features.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Callable

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
    Params,
    PipelineError,
    RunPaths,
    atomic_dir,
    heatmap_path,
    load_params,
    main_guard,
    misclassified_copy,
    peak_rss_mb,
    read_json,
    read_manifest,
    run_arg,
    write_csv_atomic,
    write_json_atomic,
)
from stages.explain import grad_cam, overlay
from stages.thresholds import choose_threshold, operating_points
from stages.network import (
    FEATURES_FILE,
    TrainedModel,
    frozen_and_trainable,
    input_preparation,
    load_feature_cache,
    load_image,
    load_images,
    load_trained_model,
    predict_scores,
    resolve_device,
)

log = logging.getLogger("anomaly_pipeline.evaluate")


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """Binary metrics (positive class = 1 = faulty) from true labels and positive-class probabilities: at the
    threshold, then the operating points that do not depend on it."""
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
        **operating_points(labels, scores),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def scorer(params: Params, trained: TrainedModel, device: torch.device) -> Callable[[pd.DataFrame], np.ndarray]:
    """Scores a split's manifest: from its cached frozen features when the model was trained on them,
    else from its decoded images."""
    batch_size = params.evaluate.batch_size
    if trained.finetune == "all":
        return lambda manifest: predict_scores(
            trained.network, load_images(params.data.dir, manifest["path"].tolist(), trained.image_size,
                                             trained.resize),
            batch_size, device)
    cache = load_feature_cache(params.model, trained.finetune)
    if cache.identity["backbone_sha256"] != trained.backbone_sha256:
        raise PipelineError(f"{FEATURES_FILE} holds features of other weights than the model was trained from: "
                            f"run 'dvc repro' so train and evaluate run again")
    _, head = frozen_and_trainable(trained.network, trained.finetune)
    prepare = input_preparation(trained.finetune)
    return lambda manifest: predict_scores(head, cache.lookup(manifest["sha256"].tolist()), batch_size, device, prepare)


def main() -> None:
    params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    paths = RunPaths(run)
    device = resolve_device(params.device)
    started = time.perf_counter()
    trained = load_trained_model(paths.model_file, device)
    model, size = trained.network, trained.image_size
    score = scorer(params, trained, device)
    train_manifest, test_manifest = read_manifest(paths.manifest("train")), read_manifest(paths.manifest("test"))
    threshold = params.evaluate.threshold
    if isinstance(threshold, str):
        val_manifest = read_manifest(paths.manifest("val"))
        threshold = choose_threshold(threshold, val_manifest["label"].to_numpy(), score(val_manifest),
                                     params.evaluate.target_recall)
        log.info("run %d: threshold %.4f (%s on %d validation images)", run, threshold, params.evaluate.threshold,
                 len(val_manifest))
    train_scores, test_scores = score(train_manifest), score(test_manifest)
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
            image = load_image(params.data.dir / row.path, size, trained.resize)
            cam = grad_cam(model, image, int(row.predicted), device)
            overlay(copy, cam).save(heatmap_path(copy))
    evaluate_seconds = time.perf_counter() - started
    train_summary = read_json(paths.train_summary_file)
    metrics = {
        "run": run,
        "train_accuracy": train_accuracy,
        **{f"test_{name}": value for name, value in test.items() if name != "confusion_matrix"},
        "confusion_matrix": test["confusion_matrix"],
        "test_images": len(test_manifest),
        "threshold": threshold,
        **{key: value for key, value in train_summary.items() if key not in ("weights", "device")},
        "evaluate_seconds": round(evaluate_seconds, 2),
        "evaluate_peak_rss_mb": round(peak_rss_mb(), 1),
        "pretrained": train_summary["weights"] == "imagenet",
    }
    metrics = {key: round(value, 6) if isinstance(value, float) else value for key, value in metrics.items()}
    write_json_atomic(paths.metrics_file, metrics)
    cm = test["confusion_matrix"]
    log.info("run %d: test accuracy %.4f, balanced %.4f, precision %.4f, recall %.4f (TN %d FP %d FN %d TP %d) "
             "at threshold %.4f", run, test["accuracy"], test["balanced_accuracy"] or float("nan"), test["precision"],
             test["recall"], cm["tn"], cm["fp"], cm["fn"], cm["tp"], threshold)


if __name__ == "__main__":
    main_guard(main)
