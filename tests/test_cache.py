"""DVC's cache follows the data flow: what a stage does not read never reruns it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import DVC, SMALL, commit_all, make_project, reproduce_and_commit, run, write_params

# Long: whole pipelines in temporary repositories (python -m pytest -q -m slow tests).
pytestmark = pytest.mark.slow


def stale_stages(project: Path) -> set[str]:
    """The stages `dvc status` lists as changed."""
    status = run([*DVC, "status"], project).stdout
    return set(re.findall(r"^(\S+):$", status, flags=re.MULTILINE))


def test_settings_train_does_not_read_and_identical_features_leave_every_model_up_to_date(
        cell_images: Path, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    changes = {**SMALL, "data.dir": str(cell_images), "train.finetune": "head"}
    write_params(project, changes)
    commit_all(project, "head preset")
    reproduce_and_commit(project)
    assert stale_stages(project) == set()

    # features reruns (forced) and writes the same bytes: no run trains again.
    run([*DVC, "repro", "-f", "--single-item", "features"], project)
    assert stale_stages(project) == set()

    # evaluate.batch_size is read by evaluate only.
    write_params(project, {**changes, "evaluate.batch_size": 7})
    stale = stale_stages(project)
    assert {"evaluate@0", "evaluate@1", "check-params"} <= stale
    assert not any(stage.startswith(("train", "features", "prepare-split")) for stage in stale), stale
