"""predict: classify new images with a trained run's model; prints a table and writes a CSV.

    anomaly-predict IMAGE_OR_FOLDER ... [--run N] [--threshold 0.5] [--output predictions.csv]
    (or: python -m anomaly_pipeline.predict ...)

Without --run it uses the run with the best validation figure (train.best_by: the lowest loss); without
--threshold, the threshold that run's evaluation used (evaluate.threshold, or what its rule chose on the run's
validation images). Folders are searched recursively; files that cannot be read are reported and skipped. The
table goes to the terminal; a CSV is written only where --output says.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
import torch

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.files import read_json, write_csv_atomic
from anomaly_pipeline.images import list_folder
from anomaly_pipeline.layout import RunPaths
from anomaly_pipeline.metrics import predicted_labels
from anomaly_pipeline.model import load_trained_model, predict_scores, resolve_device
from anomaly_pipeline.params import check_run, load_params
from anomaly_pipeline.tensors import load_image, normalize
from anomaly_pipeline.training import selection_key

log = logging.getLogger("anomaly_pipeline.predict")
SKIPPED = "skipped"


def best_run(runs: list[int]) -> int:
    """The trained run whose kept epoch has the best validation figure, by the rule that kept it (train.best_by)."""
    summaries = {run: read_json(RunPaths(run).model.summary) for run in runs if RunPaths(run).model.summary.is_file()}
    if not summaries:
        raise PipelineError("no trained run found: run 'dvc repro' first")
    return min(summaries, key=lambda run: selection_key(summaries[run]["best_by"], summaries[run]["best_val_loss"],
                                                        summaries[run]["best_val_roc_auc"]))


def run_threshold(run: int) -> float:
    """The decision threshold the run's evaluation used (a number, or what a rule chose on validation)."""
    path = RunPaths(run).metrics_file
    if not path.is_file():
        raise PipelineError(f"run {run} has no metrics ({path}): run 'dvc repro' so it is evaluated, "
                            f"or give --threshold")
    return float(read_json(path)["threshold"])


def collect_images(targets: list[Path]) -> list[Path]:
    """The image files named, and those found (recursively) in the folders named."""
    images: list[Path] = []
    for target in targets:
        if target.is_dir():
            images += list_folder(target).images
        elif target.is_file():
            images.append(target)
        else:
            raise PipelineError(f"{target} does not exist")
    return images


def predict(images: list[Path], run: int, threshold: float, class_names: tuple[str, str],
            device_name: str, batch_size: int) -> pd.DataFrame:
    """One row per image: path, faulty probability and label (faulty when the probability >= threshold).

    Unreadable files get no probability (NaN), the label ``skipped`` and their error in the ``error`` column.
    """
    device = resolve_device(device_name)
    trained = load_trained_model(RunPaths(run).model.model, device)
    rows, tensors, readable = [], [], []
    for path in images:
        row = {"path": str(path), "faulty_probability": float("nan"), "label": SKIPPED, "error": ""}
        try:
            tensors.append(load_image(path, trained.image_size, trained.resize))
            readable.append(row)
        except PipelineError as error:
            log.warning("skipped: %s", error)
            row["error"] = str(error)
        rows.append(row)
    if tensors:
        scores = predict_scores(trained.network, torch.stack(tensors), batch_size, device, normalize)
        for row, score, predicted in zip(readable, scores, predicted_labels(scores, threshold)):
            row.update(faulty_probability=round(float(score), 6), label=class_names[predicted])
    return pd.DataFrame(rows, columns=["path", "faulty_probability", "label", "error"])


def main() -> None:
    params = load_params()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--run", type=int, help="run whose model to use (default: the best validation figure)")
    parser.add_argument("--threshold", type=float,
                        help="faulty when the probability is at least this (default: the run's evaluation threshold)")
    parser.add_argument("--output", type=Path, help="also write the table to this CSV file")
    args = parser.parse_args()
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise PipelineError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    run = best_run(params.runs) if args.run is None else check_run(args.run, params)
    threshold = run_threshold(run) if args.threshold is None else args.threshold
    images = collect_images(args.targets)
    if not images:
        raise PipelineError(f"no image files found in {', '.join(map(str, args.targets))}")
    log.info("run %d's model on %d images, threshold %.4g", run, len(images), threshold)
    table = predict(images, run, threshold, (params.data.negative_class, params.data.positive_class),
                    params.device, params.evaluate.batch_size)
    print(table.drop(columns="error").to_string(index=False, na_rep="-"))  # the result itself, on stdout
    skipped = int((table["label"] == SKIPPED).sum())
    summary = f"{len(table) - skipped} images classified" + (f", {skipped} skipped" if skipped else "")
    if args.output is not None:
        write_csv_atomic(args.output, table)
        summary += f"; wrote {args.output}"
    log.info("%s", summary)


def cli() -> None:
    """The console entry point anomaly-predict."""
    main_guard(main)


if __name__ == "__main__":
    cli()
