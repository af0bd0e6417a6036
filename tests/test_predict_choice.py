"""predict's default model: the trained run with the lowest best validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.layout import RunPaths
from anomaly_pipeline.predict import best_run


def write_summary(run: int, best_val_loss: float) -> None:
    path = RunPaths(run).model.summary
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"best_val_loss": best_val_loss}))


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
