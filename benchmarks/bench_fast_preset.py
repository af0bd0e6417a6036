"""Wall time of the whole pipeline (dvc repro) with a train.finetune preset, and where the time goes.

    python -m benchmarks.bench_fast_preset ../shared/datasets/metal-surface [--finetune head] [--runs 10]
        [--arch efficientnet_lite0 --pretrained]

A clean clone of this checkout in a temporary folder reproduces every run up to the aggregate with
data.dir set to the given folder, the architecture asked for, and model.pretrained false unless --pretrained
(the weights' values do not change the time; only ImageNet weights make the accuracy a measure of the preset).
Printed: the wall time of `dvc repro`, the time the stages spent working (features extraction, each run's
training and evaluation, as they record it), what starting the stage processes costs (interpreter and
imports, measured here per stage module), the rest (DVC itself), and the ratio against the full
fine-tuning recorded in metrics/runs.csv.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.machine import load_average, machine

PROJECT = Path(__file__).resolve().parents[1]
STAGE_MODULES = {"prepare-split": "stages.prepare_split", "features": "stages.features", "train": "stages.train",
                 "evaluate": "stages.evaluate", "aggregate": "stages.aggregate"}


def clone_with_params(destination: Path, changes: dict[str, object], commit: str = "HEAD") -> str:
    """A clean clone of this checkout at ``commit`` with dotted parameter changes written into params.yaml;
    returns the commit's short hash."""
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(destination)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=destination, check=True)
    params_file = destination / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=destination, check=True,
                          capture_output=True, text=True).stdout.strip()


def start_seconds(project: Path, module: str, repeats: int = 3) -> float:
    """Fastest of a few starts of a stage's module: interpreter, imports and exit, no work."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=project, check=True)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder with clean/ and faulty/")
    parser.add_argument("--finetune", choices=("head", "last_block", "all"), default="head")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--arch", choices=("resnet18", "efficientnet_lite0"), default="resnet18")
    parser.add_argument("--pretrained", action="store_true",
                        help="ImageNet weights (offline only for efficientnet_lite0, from its pip package)")
    args = parser.parse_args()
    runs = list(range(args.runs))
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder) / "project"
        commit = clone_with_params(project, {"data.dir": str(args.data_dir.resolve()), "model.arch": args.arch,
                                    "model.pretrained": args.pretrained, "train.finetune": args.finetune,
                                    "runs": runs})
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "dvc", "repro", "aggregate"], cwd=project,
                                capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"dvc repro failed:\n{result.stdout}\n{result.stderr}")
        wall = time.perf_counter() - started
        table = pd.read_csv(project / "metrics" / "runs.csv")
        summary = json.loads((project / "metrics" / "summary.json").read_text())
        # The features stage logs its time (its outputs hold no timings: train depends on them).
        features = re.search(r"features for \d+ distinct images .* in (\d+) s", result.stdout + result.stderr)
        starts = {stage: start_seconds(project, module) for stage, module in STAGE_MODULES.items()}
    counts = {"prepare-split": len(runs), "features": 1, "train": len(runs), "evaluate": len(runs), "aggregate": 1}
    work = {"features": float(features.group(1)) if features else 0.0, "train": table["train_seconds"].sum(),
            "evaluate": table["evaluate_seconds"].sum()}
    process_starts = sum(starts[stage] * count for stage, count in counts.items())
    recorded = pd.read_csv(PROJECT / "metrics" / "runs.csv")
    full_run = (recorded["train_seconds"] + recorded["evaluate_seconds"]).median()
    print(f"{date.today()}, {machine()}, commit {commit}, load {load_at_start:.2f} at the start")
    print(f"dvc repro, {len(runs)} runs, {summary['arch']}, train.finetune {args.finetune}, "
          f"{summary['weights_source']}, {args.data_dir}: "
          f"{wall:.0f} s wall ({wall / len(runs):.1f} s per run)")
    print(f"  working: features {work['features']:.1f} s, training {work['train']:.1f} s, "
          f"evaluation {work['evaluate']:.1f} s (sum {sum(work.values()):.1f} s)")
    print("  starting stage processes (interpreter + imports + exit, per start): "
          + ", ".join(f"{stage} {starts[stage]:.2f} s x {counts[stage]}" for stage in counts)
          + f" = {process_starts:.1f} s")
    print(f"  DVC and everything else (split scans, file I/O, lock files): "
          f"{wall - sum(work.values()) - process_starts:.1f} s")
    print(f"  test accuracy {summary['test_accuracy']['mean']:.4f}, "
          f"balanced {summary['test_balanced_accuracy']['mean']:.4f} "
          + ("" if args.pretrained else "(random-init features: not a measure of the preset's accuracy)"))
    print(f"full fine-tuning recorded in metrics/runs.csv: {full_run:.0f} s per run (median), "
          f"{full_run * len(runs):.0f} s for {len(runs)} runs -> this preset is "
          f"{full_run * len(runs) / wall:.1f}x faster")


if __name__ == "__main__":
    main()
