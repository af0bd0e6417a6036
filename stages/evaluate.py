"""evaluate: score one run's best model on its test (and train) images and write the run's metrics.

The decision threshold is evaluate.threshold, or what its rule chooses on the run's validation images.
Misclassified test images are copied into false_positives/ and false_negatives/, each with its Grad-CAM heatmap.
"""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score
from tqdm import tqdm

from anomaly_pipeline.entry import main_guard, peak_rss_mb, run_arg
from anomaly_pipeline.explain import grad_cam, overlay
from anomaly_pipeline.files import atomic_dir, read_json, write_csv_atomic, write_json_atomic
from anomaly_pipeline.inputs import ModelInputs
from anomaly_pipeline.layout import SPLITS, EvalFiles, RunPaths, read_manifest
from anomaly_pipeline.metrics import choose_threshold, classification_metrics, predicted_labels
from anomaly_pipeline.model import load_trained_model, predict_scores, resolve_device
from anomaly_pipeline.params import load_params
from anomaly_pipeline.tensors import load_image

log = logging.getLogger("anomaly_pipeline.evaluate")


def main() -> None:
    params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    paths = RunPaths(run)
    device = resolve_device(params.device)
    started = time.perf_counter()
    trained = load_trained_model(paths.model.model, device)
    inputs = ModelInputs.for_model(params, trained)
    _, scored_part = inputs.trained_part(trained.network)

    def score(manifest: pd.DataFrame) -> np.ndarray:
        return predict_scores(scored_part, inputs.load(manifest), params.evaluate.batch_size, device, inputs.prepare)

    manifests = {split: read_manifest(paths.split.manifest(split)) for split in SPLITS}
    threshold = params.evaluate.threshold
    if isinstance(threshold, str):
        threshold = choose_threshold(threshold, manifests["val"]["label"].to_numpy(), score(manifests["val"]),
                                     params.evaluate.target_recall)
        log.info("run %d: threshold %.4f (%s on %d validation images)", run, threshold, params.evaluate.threshold,
                 len(manifests["val"]))
    train_scores, test_scores = score(manifests["train"]), score(manifests["test"])
    test = classification_metrics(manifests["test"]["label"].to_numpy(), test_scores, threshold)
    train_accuracy = accuracy_score(manifests["train"]["label"], predicted_labels(train_scores, threshold))
    predictions = manifests["test"].assign(
        score=np.round(test_scores, 6), predicted=predicted_labels(test_scores, threshold)
    )
    with atomic_dir(paths.eval.dir) as out:
        files = EvalFiles(out)
        write_csv_atomic(files.predictions, predictions)
        files.false_positives.mkdir()
        files.false_negatives.mkdir()
        wrong = np.flatnonzero(predictions["label"] != predictions["predicted"])
        for position in tqdm(wrong, desc="grad-cam", unit="img", leave=False, disable=None):
            row = predictions.iloc[position]
            copy = files.misclassified_copy(row.path, row.label)
            shutil.copy2(params.data.dir / row.path, copy)
            image = load_image(params.data.dir / row.path, trained.image_size, trained.resize)
            overlay(copy, grad_cam(trained.network, image, int(row.predicted), device)).save(files.heatmap(copy))
    train_summary = read_json(paths.model.summary)
    metrics = {
        "run": run,
        "train_accuracy": train_accuracy,
        **{f"test_{name}": value for name, value in test.items() if name != "confusion_matrix"},
        "confusion_matrix": test["confusion_matrix"],
        "test_images": len(manifests["test"]),
        "threshold": threshold,
        **{key: value for key, value in train_summary.items() if key != "device"},
        "evaluate_seconds": round(time.perf_counter() - started, 2),
        "evaluate_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    metrics = {key: round(value, 6) if isinstance(value, float) else value for key, value in metrics.items()}
    write_json_atomic(paths.metrics_file, metrics)
    cm = test["confusion_matrix"]
    log.info("run %d: test accuracy %.4f, balanced %.4f, precision %.4f, recall %.4f (TN %d FP %d FN %d TP %d) "
             "at threshold %.4f", run, test["accuracy"], test["balanced_accuracy"] or float("nan"), test["precision"],
             test["recall"], cm["tn"], cm["fp"], cm["fn"], cm["tp"], threshold)


if __name__ == "__main__":
    main_guard(main)
