"""The study's method against the options for unseen data, on four real sets: one table of test results.

    python -m benchmarks.bench_unseen_sets [--sets fruit elpv-rare ...] [--configs study robust ...] [--runs 3]
    python -m benchmarks.bench_unseen_sets --table

Each cell (set x configuration) is a clean clone of this checkout (HEAD, or --commit) that runs `dvc repro` with
model.pretrained false, runs [0 .. runs-1], data.dir set to the set and the configuration's parameters. Its
per-run test figures are appended to benchmarks/results/unseen_sets.jsonl as soon as the cell ends (with the
date, commit and machine), and cells already there are not run again: a long measurement can be stopped and
resumed. Balanced accuracy, recall and specificity are at each run's own decision threshold; PR-AUC (average
precision) is computed here from the run's test predictions, so cells measured before the pipeline reported
it are comparable. Configurations are compared by the validation figures recorded beside (each run's balanced
accuracy and PR-AUC on its own validation images), never by the test figures. Seconds per run = training +
evaluation as the stages record them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml
from sklearn.metrics import average_precision_score, balanced_accuracy_score

from benchmarks.bench_fast_preset import clone_with_params
from benchmarks.elpv_folders import write_folders

PROJECT = Path(__file__).resolve().parents[1]
RESULTS_FILE = PROJECT / "benchmarks" / "results" / "unseen_sets.jsonl"
SHARED = PROJECT.parent / "shared" / "datasets"
# Built from the installed elpv-dataset package when missing (never inside the repository).
BUILT_SETS = Path(os.environ.get("ANOMALY_BENCH_DATA", PROJECT.parent / "bench-data"))

# Set name -> (folder, negative class, positive class).
SETS = {
    "metal-surface": (SHARED / "metal-surface", "clean", "faulty"),
    "fruit": (SHARED / "fruit", "fresh", "rotten"),
    "elpv": (BUILT_SETS / "elpv", "clean", "faulty"),
    "elpv-rare": (BUILT_SETS / "elpv-rare", "clean", "faulty"),
}
PRESET_MARK = "# robust preset"


def readme_preset() -> dict[str, object]:
    """The README's robust preset: the -S changes of its one 'dvc exp run ... # robust preset' line."""
    line = next(line for line in (PROJECT / "README.md").read_text().splitlines()
                if line.startswith("dvc exp run ") and line.rstrip().endswith(PRESET_MARK))
    words = shlex.split(line[: line.rindex(PRESET_MARK)])
    changes = [words[index + 1] for index, word in enumerate(words) if word == "-S"]
    return {key: yaml.safe_load(value) for key, value in (change.split("=", 1) for change in changes)}


# Configuration name -> parameter changes on top of params.yaml (the study's method). "robust" is the README's
# robust preset; "preset-1" the first candidate it replaced; the others are options one at a time.
CONFIGS: dict[str, dict[str, object]] = {
    "study": {},
    "robust": readme_preset(),
    "preset-1": {"train.class_balance": "sampler", "train.augment": ["flip", "rotate90", "color"],
                 "model.resize": "pad", "evaluate.threshold": "max_balanced_accuracy"},
    "sampler": {"train.class_balance": "sampler"},
    "weighted_loss": {"train.class_balance": "weighted_loss"},
    "augment": {"train.augment": ["flip", "rotate90"]},
    "threshold": {"evaluate.threshold": "max_balanced_accuracy"},
    "pad": {"model.resize": "pad"},
}


def set_folder(name: str) -> tuple[Path, str, str]:
    """The set's folder and class names; the elpv sets are laid out from the installed package first."""
    folder, negative, positive = SETS[name]
    if name.startswith("elpv") and not folder.exists():
        write_folders(folder, rare=name == "elpv-rare")
    return folder, negative, positive


def validation_figures(project: Path, runs: int) -> list[dict[str, float]]:
    """Each run's balanced accuracy (at its recorded threshold) and PR-AUC on its own validation images: what a
    configuration is chosen by (the test figures are only reported)."""
    from anomaly_pipeline.inputs import ModelInputs
    from anomaly_pipeline.layout import RunPaths, read_manifest
    from anomaly_pipeline.model import load_trained_model, predict_scores, resolve_device
    from anomaly_pipeline.params import load_params

    figures = []
    with contextlib.chdir(project):
        params = load_params()
        device = resolve_device(params.device)
        for run in range(runs):
            paths = RunPaths(run)
            trained = load_trained_model(paths.model.model, device)
            inputs = ModelInputs.for_model(params, trained)
            _, scored_part = inputs.trained_part(trained.network)
            manifest = read_manifest(paths.split.manifest("val"))
            scores = predict_scores(scored_part, inputs.load(manifest), params.evaluate.batch_size, device,
                                    inputs.prepare)
            threshold = json.loads(paths.metrics_file.read_text()).get("threshold", 0.5)
            labels = manifest["label"].to_numpy()
            figures.append({"val_balanced_accuracy": float(balanced_accuracy_score(labels, scores >= threshold)),
                            "val_pr_auc": float(average_precision_score(labels, scores))})
    return figures


def run_cell(set_name: str, config: str, runs: int, commit: str) -> dict:
    """One `dvc repro` of a configuration on a set; its per-run test figures."""
    folder, negative, positive = set_folder(set_name)
    changes = {"data.dir": str(folder), "data.negative_class": negative, "data.positive_class": positive,
               "model.pretrained": False, "runs": list(range(runs)), **CONFIGS[config]}
    with tempfile.TemporaryDirectory() as temporary:
        project = Path(temporary) / "project"
        commit = clone_with_params(project, changes, commit)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{set_name} / {config}: dvc repro failed:\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        per_run = []
        validation = validation_figures(project, runs)
        for run in range(runs):
            metrics = json.loads((project / "metrics" / "runs" / f"run-{run}.json").read_text())
            predictions = pd.read_csv(project / "data" / "runs" / f"run-{run}" / "eval" / "predictions.csv")
            per_run.append({
                "run": run,
                "balanced_accuracy": metrics["test_balanced_accuracy"],
                "recall": metrics["test_recall"],
                "specificity": metrics["test_specificity"],
                "pr_auc": float(average_precision_score(predictions["label"], predictions["score"])),
                "threshold": metrics.get("threshold", 0.5),
                "epochs_run": metrics["epochs_run"],
                "seconds": metrics["train_seconds"] + metrics["evaluate_seconds"],
                **validation[run],
            })
    return {"set": set_name, "config": config, "changes": CONFIGS[config], "commit": commit,
            "date": datetime.date.today().isoformat(), "wall_seconds": round(wall, 1),
            "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPU cores, no GPU used",
            "runs": per_run}


def read_results() -> list[dict]:
    """Every measured cell (the latest measurement of a set x configuration wins)."""
    if not RESULTS_FILE.exists():
        return []
    cells = {}
    for line in RESULTS_FILE.read_text().splitlines():
        if line.strip():
            cell = json.loads(line)
            cells[(cell["set"], cell["config"])] = cell
    return list(cells.values())


def table(cells: list[dict]) -> str:
    """One row per cell: mean ± std over runs of each figure, in percent; seconds per run."""
    def spread(values: list[float]) -> str:
        values = np.asarray(values, dtype=float) * 100
        return f"{values.mean():5.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:4.1f}"

    rows = []
    order = {name: index for index, name in enumerate(SETS)}
    for cell in sorted(cells, key=lambda cell: (order.get(cell["set"], 99), cell["config"] != "study", cell["config"])):
        runs = cell["runs"]
        rows.append({
            "set": cell["set"], "configuration": cell["config"], "runs": len(runs),
            "balanced acc %": spread([run["balanced_accuracy"] for run in runs]),
            "recall %": spread([run["recall"] for run in runs]),
            "specificity %": spread([run["specificity"] for run in runs]),
            "PR-AUC %": spread([run["pr_auc"] for run in runs]),
            "val BA %": spread([run["val_balanced_accuracy"] for run in runs]) if "val_balanced_accuracy" in runs[0]
            else "-",
            "s/run": f"{np.mean([run['seconds'] for run in runs]):.0f}",
            "commit": cell["commit"],
        })
    return pd.DataFrame(rows).to_string(index=False) if rows else "(no results yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commit", default="HEAD", help="the checkout's commit to measure (default: HEAD)")
    parser.add_argument("--again", action="store_true", help="measure cells already recorded again (the latest wins)")
    parser.add_argument("--table", action="store_true", help="only print the table of what is measured")
    args = parser.parse_args()
    if not args.table:
        done = set() if args.again else {(cell["set"], cell["config"]) for cell in read_results()}
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        for set_name in args.sets:
            for config in args.configs:
                if (set_name, config) in done:
                    continue
                print(f"{datetime.datetime.now():%H:%M} {set_name} / {config} ...", flush=True)
                cell = run_cell(set_name, config, args.runs, args.commit)
                with RESULTS_FILE.open("a") as results:
                    results.write(json.dumps(cell) + "\n")
                print(table([cell]), flush=True)
    print("model.pretrained false (random initialisation), mean ± std over runs, test split")
    print(table(read_results()))


if __name__ == "__main__":
    main()
