"""predict's default model: the trained run whose kept epoch has the best validation figure (train.best_by)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.layout import RunPaths
from anomaly_pipeline.predict import best_run


def write_summary(run: int, best_val_loss: float, best_val_roc_auc: float = 0.9, best_by: str = "val_loss") -> None:
    path = RunPaths(run).model.summary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"best_by": best_by, "best_val_loss": best_val_loss,
                                "best_val_roc_auc": best_val_roc_auc}))


def test_best_run_has_the_lowest_validation_loss_among_the_trained_runs(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="no trained run found"):
        best_run([0, 1, 2])
    for run, loss in ((0, 0.30), (1, 0.12), (2, 0.25), (5, 0.01)):
        write_summary(run, loss)
    assert best_run([0, 1, 2]) == 1  # run 5 is trained but not in 'runs'
    assert best_run([0, 2, 3]) == 2  # run 3 is listed but not trained yet
    assert best_run([0, 1, 2, 5]) == 5


def test_best_run_by_roc_auc_when_the_runs_kept_their_epoch_by_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for run, loss, auc in ((0, 0.10, 0.95), (1, 0.30, 0.99), (2, 0.20, 0.99)):
        write_summary(run, loss, auc, "val_roc_auc")
    assert best_run([0, 1, 2]) == 2  # the highest ROC-AUC, the tie to the lower loss
    assert best_run([0, 1]) == 1
