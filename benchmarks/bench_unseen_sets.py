"""The study's method against the options for unseen data, on four real sets: one table of test results.

    python -m benchmarks.bench_unseen_sets [--sets fruit elpv-rare ...] [--configs study robust ...] [--runs 3]
    python -m benchmarks.bench_unseen_sets --table
    python -m benchmarks.bench_unseen_sets --rescore [--sets ...] [--configs robust ...]
    python -m benchmarks.bench_unseen_sets --misses --sets fruit [--configs lite0 lite0-robust ...]

Each run of a cell (set x configuration) is a clean clone of this checkout (HEAD, or --commit) that runs `dvc repro`
with the study's network, ResNet18, and model.pretrained false (unless the configuration asks for Lite0 with
ImageNet weights), runs [N] (run N's split, seed and model do not depend on the other runs), data.dir set to the set
and the configuration's parameters. Its test figures, its validation figures and both sets of scores (label, score)
are appended to benchmarks/results/unseen_sets.jsonl as soon as it ends (with the date, commit and machine), and
runs already there are not run again: a measurement of many hours can be stopped and resumed run by run. Balanced
accuracy, recall and specificity are at each run's own decision threshold; PR-AUC (average precision) is computed
here from the run's test predictions, so cells measured before the pipeline reported it are comparable.
Configurations are compared by the validation figures recorded beside (each run's balanced accuracy and PR-AUC on
its own validation images), never by the test figures. Seconds per run = training + evaluation as the stages record
them. A change of the threshold rule alone does not need hours of training again: --rescore judges every recorded
model that trained as a configuration with a threshold rule does (its own runs; the study's runs for 'threshold') by
this checkout's rule, from the run's recorded validation and test scores, and appends the figures (the commit column
then reads TRAINED>RULE, RULE being the last commit that changed the rule). Earlier candidates for the preset stay
in the results under their own names (preset-1, preset-2), measured at their commits. --misses lists the test images
that several recorded runs misclassified (from the runs kept in ../bench-runs): a few hard or debatable images show
apart from errors spread over the set.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import average_precision_score

from anomaly_pipeline.metrics import choose_threshold, classification_metrics, predicted_labels
from benchmarks.bench_fast_preset import clone_with_params
from benchmarks.elpv_folders import write_folders
from benchmarks.machine import machine
from benchmarks.readme import command_lines

RANDOM_INIT = "random init"  # what every record without a weights field was measured from

PROJECT = Path(__file__).resolve().parents[1]
RESULTS_FILE = PROJECT / "benchmarks" / "results" / "unseen_sets.jsonl"
SHARED = PROJECT.parent / "shared" / "datasets"
# Built from the installed elpv-dataset package when missing (never inside the repository).
BUILT_SETS = Path(os.environ.get("ANOMALY_BENCH_DATA", PROJECT.parent / "bench-data"))
# Each measured run's folder (split lists, trained model, test predictions) is kept here, so that later
# evaluation-time ideas can be tried on the same models without training them again (never inside the repository).
KEPT_RUNS = Path(os.environ.get("ANOMALY_BENCH_RUNS", PROJECT.parent / "bench-runs"))

# Set name -> (folder, negative class, positive class).
SETS = {
    "metal-surface": (SHARED / "metal-surface", "clean", "faulty"),
    "fruit": (SHARED / "fruit", "fresh", "rotten"),
    "elpv": (BUILT_SETS / "elpv", "clean", "faulty"),
    "elpv-rare": (BUILT_SETS / "elpv-rare", "clean", "faulty"),
}
PRESET_MARK = "# robust preset"


def readme_preset_words() -> list[str]:
    """The README's robust preset command, split into words: its one 'dvc exp run ... # robust preset' command."""
    lines = [line for line in command_lines() if line.rstrip().endswith(PRESET_MARK)]
    if len(lines) != 1 or not lines[0].startswith("dvc exp run "):
        raise ValueError(f"README.md must hold exactly one line 'dvc exp run ... {PRESET_MARK}' (found {len(lines)} "
                         f"ending with the mark)")
    return shlex.split(lines[0][: lines[0].rindex(PRESET_MARK)])


def readme_preset() -> dict[str, object]:
    """The README's robust preset: the -S changes of its command line."""
    words = readme_preset_words()
    changes = [words[index + 1] for index, word in enumerate(words) if word == "-S"]
    return {key: yaml.safe_load(value) for key, value in (change.split("=", 1) for change in changes)}


# Configuration name -> parameter changes on top of params.yaml with ResNet18, random init (the study's method).
# "lite0-robust" is the README's robust preset (read from its line, on Lite0 with ImageNet weights); "robust" is that
# preset as it stood with random init, until 2026-12-03 (the same options without model.arch), and "robust-..." the
# candidates measured then; the others are options one at a time.
LITE0_IMAGENET = {"model.arch": "efficientnet_lite0", "model.pretrained": True}
LITE0_ROBUST = {**LITE0_IMAGENET, **readme_preset()}
LITE0_LAST_BLOCK = {**LITE0_IMAGENET, "train.finetune": "last_block"}
RANDOM_INIT_ROBUST = {"train.class_balance": "weighted_loss", "train.augment": ["flip", "rotate90"],
                      "model.resize": "pad", "evaluate.threshold": "max_balanced_accuracy"}
CONFIGS: dict[str, dict[str, object]] = {
    "study": {},
    "robust": RANDOM_INIT_ROBUST,
    # A preset candidate, not preferred on elpv: the same with a training cap of 30 epochs (every robust run on fruit
    # and elpv and 2 of 3 on metal-surface stopped at the cap of 15; early stopping keeps the best-validation weights).
    "robust-cap30": {**RANDOM_INIT_ROBUST, "train.max_epochs": 30},
    # The robust preset at the elpv cells' own size (300 px instead of 224: thin cracks keep more pixels; about 1.8x
    # the arithmetic).
    "robust-300px": {**RANDOM_INIT_ROBUST, "model.image_size": 300},
    # The cap of 30 with twice the patience (on elpv-rare's 21 validation defects the validation loss jumps between
    # epochs). Not adopted: the scheduler has cut the learning rate by then, and 5 of 6 runs kept the same weights.
    "robust-cap30-patience6": {**RANDOM_INIT_ROBUST, "train.max_epochs": 30, "train.patience": 6},
    "sampler": {"train.class_balance": "sampler"},
    "weighted_loss": {"train.class_balance": "weighted_loss"},
    "augment": {"train.augment": ["flip", "rotate90"]},
    "threshold": {"evaluate.threshold": "max_balanced_accuracy"},
    "pad": {"model.resize": "pad"},
    # ImageNet features without a download: EfficientNet-Lite0 with the pip package's weights, the study's method
    # otherwise; the README's robust preset; and the floor any fine-tuning must clear, a frozen backbone with a
    # linear head (train.finetune head).
    "lite0": LITE0_IMAGENET,
    "lite0-robust": LITE0_ROBUST,
    "lite0-head": {**LITE0_IMAGENET, "train.finetune": "head"},
    # The README's fast preset from 2026-12-03 to 2026-12-06 (chosen over the head alone on validation figures):
    # Lite0's last stage and head convolution trained too, on the cached output of the frozen stages.
    "lite0-last-block": LITE0_LAST_BLOCK,
    # The floor at the elpv cells' own size (300 px instead of 224): do the frozen features rank thin cracks better
    # with more of their pixels? Measured: no (worse on elpv and elpv-rare, on test and validation alike).
    "lite0-head-300px": {**LITE0_IMAGENET, "train.finetune": "head", "model.image_size": 300},
    # A candidate for the robust preset with ImageNet features: fine-tuning that keeps them, the head alone for 2
    # epochs first, then every other layer at a tenth of the head's rate (LP-FT, Kumar et al. 2022).
    "lite0-robust-lpft": {**LITE0_ROBUST, "train.head_epochs": 2, "train.backbone_lr_factor": 0.1},
    # The kept epoch chosen by validation ROC-AUC instead of the validation loss (train.best_by), for the robust and
    # the fast preset: on the solar cells the lowest loss came at early, confident epochs that ranked no better than
    # the frozen features.
    "lite0-robust-auc": {**LITE0_ROBUST, "train.best_by": "val_roc_auc"},
    "lite0-last-block-auc": {**LITE0_LAST_BLOCK, "train.best_by": "val_roc_auc"},
    # The fast preset either way with each run's threshold chosen on its validation images (measured by --rescore
    # from the runs above: the epoch a rule keeps ranks well, and 0.5 need not be its operating point). The second
    # is the README's fast preset since 2026-12-06, chosen on validation figures.
    "lite0-last-block-threshold": {**LITE0_LAST_BLOCK, "evaluate.threshold": "max_balanced_accuracy"},
    "lite0-last-block-auc-threshold": {**LITE0_LAST_BLOCK, "train.best_by": "val_roc_auc",
                                       "evaluate.threshold": "max_balanced_accuracy"},
}


def set_folder(name: str) -> tuple[Path, str, str]:
    """The set's folder and class names; the elpv sets are laid out from the installed package first."""
    folder, negative, positive = SETS[name]
    if name.startswith("elpv") and not folder.exists():
        write_folders(folder, rare=name == "elpv-rare")
    return folder, negative, positive


def validation_scores(project: Path, run: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``run``'s validation labels and scores, by its trained model as the evaluate stage scores them."""
    from anomaly_pipeline.inputs import ModelInputs
    from anomaly_pipeline.layout import RunPaths, read_manifest
    from anomaly_pipeline.model import load_trained_model, predict_scores, resolve_device
    from anomaly_pipeline.params import load_params

    with contextlib.chdir(project):
        params = load_params()
        device = resolve_device(params.device)
        paths = RunPaths(run)
        trained = load_trained_model(paths.model.model, device)
        inputs = ModelInputs.for_model(params, trained)
        _, scored_part = inputs.trained_part(trained.network)
        manifest = read_manifest(paths.split.manifest("val"))
        scores = predict_scores(scored_part, inputs.load(manifest), params.evaluate.batch_size, device,
                                inputs.prepare)
    return manifest["label"].to_numpy(), scores


def rounded(values: np.ndarray) -> list[float]:
    return [round(float(value), 5) for value in values]


def measure_run(set_name: str, config: str, run: int, commit: str) -> dict:
    """One run of a configuration on a set (`dvc repro` of a clone with runs [run]): its figures and scores."""
    folder, negative, positive = set_folder(set_name)
    changes = {"data.dir": str(folder), "data.negative_class": negative, "data.positive_class": positive,
               "model.arch": "resnet18", "model.pretrained": False, "runs": [run], **CONFIGS[config]}
    with tempfile.TemporaryDirectory() as temporary:
        project = Path(temporary) / "project"
        commit = clone_with_params(project, changes, commit)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{set_name} / {config} / run {run}: dvc repro failed:\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        metrics = json.loads((project / "metrics" / "runs" / f"run-{run}.json").read_text())
        test = pd.read_csv(project / "data" / "runs" / f"run-{run}" / "eval" / "predictions.csv")
        val_labels, val_scores = validation_scores(project, run)
        kept = KEPT_RUNS / set_name / config / f"run-{run}"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(project / "data" / "runs" / f"run-{run}", kept)
    threshold = metrics.get("threshold", 0.5)
    return {
        "set": set_name, "config": config, "run": run, "changes": CONFIGS[config], "commit": commit,
        "date": datetime.date.today().isoformat(), "wall_seconds": round(wall, 1),
        "machine": machine(),
        "weights": metrics["weights_source"],
        "balanced_accuracy": metrics["test_balanced_accuracy"],
        "recall": metrics["test_recall"],
        "specificity": metrics["test_specificity"],
        "pr_auc": float(average_precision_score(test["label"], test["score"])),
        "threshold": threshold,
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        "seconds": metrics["train_seconds"] + metrics["evaluate_seconds"],
        "val_balanced_accuracy": classification_metrics(val_labels, val_scores, threshold)["balanced_accuracy"],
        "val_pr_auc": float(average_precision_score(val_labels, val_scores)),
        "kept": str(kept),
        "scores": {"val": {"label": val_labels.tolist(), "score": rounded(val_scores)},
                   "test": {"label": test["label"].tolist(), "score": rounded(test["score"].to_numpy())}},
    }


RULE_SOURCE = "anomaly_pipeline/metrics.py"  # the threshold rules and the figures at a threshold


def rule_commit() -> str:
    """The short hash of the last commit that changed the threshold rules; they must be as committed here."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, check=True).stdout.strip()

    if git("status", "--porcelain", RULE_SOURCE):
        raise SystemExit(f"{RULE_SOURCE} has uncommitted changes: commit them before --rescore, so that the rule "
                         "that chose the thresholds has a commit")
    return git("log", "-1", "--format=%h", "--", RULE_SOURCE)


def training_changes(changes: dict[str, object]) -> dict[str, object]:
    """The parameter changes that reach the trained models (every one but the evaluate stage's)."""
    return {key: value for key, value in changes.items() if not key.startswith("evaluate.")}


def rescore(record: dict, config: str, commit: str, default_target_recall: float) -> dict:
    """A recorded run's model judged as ``config`` judges it: the threshold chosen by this checkout's rule from
    the run's recorded validation scores, and the test figures at that threshold. This is what the evaluate stage
    at ``commit`` computes from the same model: ``config`` trains exactly as the recorded run did."""
    changes = CONFIGS[config]
    val, test = ({key: np.asarray(values) for key, values in record["scores"][part].items()}
                 for part in ("val", "test"))
    threshold = choose_threshold(changes["evaluate.threshold"], val["label"], val["score"],
                                 changes.get("evaluate.target_recall", default_target_recall))
    figures = classification_metrics(test["label"], test["score"], threshold)
    return {**record, "config": config, "changes": changes, "rescored_from": record["config"],
            "rule_commit": commit, "date": datetime.date.today().isoformat(), "threshold": threshold,
            "balanced_accuracy": figures["balanced_accuracy"], "recall": figures["recall"],
            "specificity": figures["specificity"],
            "val_balanced_accuracy": classification_metrics(val["label"], val["score"], threshold)["balanced_accuracy"]}


def rescored_runs(sets: list[str], configs: list[str], commit: str) -> list[dict]:
    """Each configuration with a threshold rule, on each set, rescored by ``commit``'s rule from every recorded
    run (with scores) that trained as it does: its own runs first, then e.g. the study's runs for 'threshold'."""
    from anomaly_pipeline.params import load_params

    default_target_recall = load_params(PROJECT / "params.yaml").evaluate.target_recall
    cells = read_results()
    records = []
    for config in (name for name in configs if isinstance(CONFIGS[name].get("evaluate.threshold"), str)):
        for set_name in sets:
            done = {run["run"] for run in cells.get((set_name, config), []) if run.get("rule_commit") == commit}
            sources = sorted({name for cell_set, name in cells if cell_set == set_name},
                             key=lambda name: name != config)
            for source in sources:
                for run in cells[(set_name, source)]:
                    if ("scores" in run and run["run"] not in done
                            and training_changes(run["changes"]) == training_changes(CONFIGS[config])):
                        records.append(rescore(run, config, commit, default_target_recall))
                        done.add(run["run"])
    return records


def read_results() -> dict[tuple[str, str], list[dict]]:
    """Every measured run by (set, configuration), in run order; the latest measurement of a run wins. Lines
    written before runs were recorded one by one hold a whole cell ("runs": [...]) and are read as its runs."""
    if not RESULTS_FILE.exists():
        return {}
    latest: dict[tuple[str, str, int], dict] = {}
    for line in RESULTS_FILE.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        cell_fields = {key: value for key, value in record.items() if key != "runs"}
        for run in record.get("runs", [record]):
            latest[(record["set"], record["config"], run["run"])] = {**cell_fields, **run}
    cells: dict[tuple[str, str], list[dict]] = {}
    for (set_name, config, _), run in sorted(latest.items()):
        cells.setdefault((set_name, config), []).append(run)
    return cells


def table(cells: dict[tuple[str, str], list[dict]]) -> str:
    """One row per cell: mean ± std over runs of each figure, in percent; each run's threshold; seconds per run;
    the commit(s)."""
    def spread(values: list[float]) -> str:
        values = np.asarray(values, dtype=float) * 100
        return f"{values.mean():5.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:4.1f}"

    rows = []
    order = {name: index for index, name in enumerate(SETS)}
    for (set_name, config), runs in sorted(cells.items(), key=lambda item: (order.get(item[0][0], 99),
                                                                             item[0][1] != "study", item[0][1])):
        rows.append({
            "set": set_name, "configuration": config, "weights": runs[0].get("weights", RANDOM_INIT),
            "runs": len(runs),
            "balanced acc %": spread([run["balanced_accuracy"] for run in runs]),
            "recall %": spread([run["recall"] for run in runs]),
            "specificity %": spread([run["specificity"] for run in runs]),
            "PR-AUC %": spread([run["pr_auc"] for run in runs]),
            "val BA %": spread([run["val_balanced_accuracy"] for run in runs])
            if all("val_balanced_accuracy" in run for run in runs) else "-",
            "val PR-AUC %": spread([run["val_pr_auc"] for run in runs]) if all("val_pr_auc" in run for run in runs)
            else "-",
            "thresholds": "/".join(f"{run['threshold']:.2f}" for run in runs),
            "s/run": f"{np.mean([run['seconds'] for run in runs]):.0f}",
            "commit": ",".join(dict.fromkeys(run["commit"] + (f">{run['rule_commit']}" if "rule_commit" in run else "")
                                             for run in runs)),
        })
    return pd.DataFrame(rows).to_string(index=False) if rows else "(no results yet)"


SHOWN_MISSES = 20  # images listed per set by --misses, the most often missed first


def recurring_misses(cells: dict[tuple[str, str], list[dict]], sets: list[str], configs: list[str]) -> str:
    """Per set, the test images misclassified in more than one recorded run of ``configs`` (each run at its own
    threshold, its image paths from the kept run's predictions): how often each was missed, and how often tested."""
    lines = []
    for set_name in sets:
        tested: Counter[str] = Counter()
        missed: Counter[str] = Counter()
        runs = [run for config in configs for run in cells.get((set_name, config), [])
                if "scores" in run and Path(run.get("kept", "")).joinpath("eval", "predictions.csv").exists()]
        for run in runs:
            kept = pd.read_csv(Path(run["kept"]) / "eval" / "predictions.csv")
            test = run["scores"]["test"]
            if kept["label"].tolist() != test["label"] or not np.allclose(kept["score"], test["score"], atol=1e-5):
                raise SystemExit(f"{run['kept']}: its predictions do not match the recorded run "
                                 f"({set_name} / {run['config']} / run {run['run']}): measure it again (--again)")
            tested.update(kept["path"])
            wrong = predicted_labels(test["score"], run["threshold"]) != np.asarray(test["label"])
            missed.update(kept["path"][wrong])
        total = sum(missed.values())
        recurring = [path for path, count in missed.most_common() if count > 1]
        lines.append(f"{set_name}: {total} misclassifications in {len(runs)} runs ({', '.join(configs)}), "
                     f"{sum(missed[path] for path in recurring)} of them on {len(recurring)} images missed more "
                     "than once")
        lines += [f"  missed {missed[path]} of {tested[path]} times  {path}" for path in recurring[:SHOWN_MISSES]]
        if len(recurring) > SHOWN_MISSES:
            lines.append(f"  ... and {len(recurring) - SHOWN_MISSES} more images")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commit", default="HEAD", help="the checkout's commit to measure (default: HEAD)")
    parser.add_argument("--again", action="store_true", help="measure runs already recorded again (the latest wins)")
    parser.add_argument("--table", action="store_true", help="only print the table of what is measured")
    parser.add_argument("--rescore", action="store_true",
                        help="judge recorded models as each configuration with a threshold rule does, with this "
                             "checkout's rule, from their recorded scores (no training)")
    parser.add_argument("--misses", action="store_true",
                        help="only list the test images that more than one recorded run misclassified")
    args = parser.parse_args()
    if args.misses:
        print(recurring_misses(read_results(), args.sets, args.configs))
        return
    if args.rescore:
        records = rescored_runs(args.sets, args.configs, rule_commit())
        with RESULTS_FILE.open("a") as results:
            results.writelines(json.dumps(record) + "\n" for record in records)
    elif not args.table:
        done = set() if args.again else {(run["set"], run["config"], run["run"])
                                         for runs in read_results().values() for run in runs}
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        for set_name in args.sets:
            for config in args.configs:
                for run in range(args.runs):
                    if (set_name, config, run) in done:
                        continue
                    print(f"{datetime.datetime.now():%H:%M} {set_name} / {config} / run {run} ...", flush=True)
                    record = measure_run(set_name, config, run, args.commit)
                    with RESULTS_FILE.open("a") as results:
                        results.write(json.dumps(record) + "\n")
                    print(table({(set_name, config): [record]}), flush=True)
    print("mean ± std over runs, test split; weights: which weights each cell started from (records older than the "
          "column: random init)")
    print(table(read_results()))


if __name__ == "__main__":
    main()
