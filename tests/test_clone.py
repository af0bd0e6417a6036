"""A clone is the whole project: the committed result is what params.yaml and the code at HEAD make, and DVC
reruns nothing that did not change, with Python writing its bytecode as it does on a user's machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tests.conftest import (
    DVC,
    PROJECT,
    SMALL,
    commit_all,
    dvc_offline,
    flatten,
    make_project,
    own_images,
    run,
    run_offline,
    write_params,
)


def test_the_committed_lock_was_made_with_params_yaml() -> None:
    params = flatten(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    stages = yaml.safe_load((PROJECT / "dvc.lock").read_text())["stages"]
    differing = {f"{stage}: {key}": (value, params.get(key, "<absent>"))
                 for stage, entry in stages.items()
                 for key, value in flatten(entry.get("params", {}).get("params.yaml", {})).items()
                 if params.get(key, "<absent>") != value}
    assert not differing, f"dvc.lock (recorded, params.yaml): {differing}; re-make the result with 'dvc repro'"
    assert {"check-params", "study-data", "aggregate"} <= set(stages)


def changes_other_than_missing_outputs(project: Path) -> dict[str, list]:
    """`dvc status` of ``project``, less what a clone lacks before its first run (outputs not yet in the cache, and
    dependencies that are, or hold, such outputs): what remains is a changed parameter, file or code."""
    status = json.loads(dvc_offline("dvc status --json", project).stdout)
    outputs = {out["path"] for stage in yaml.safe_load((project / "dvc.lock").read_text())["stages"].values()
               for out in stage.get("outs", [])}
    changed: dict[str, list] = {}
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict):
                kind, paths = next(iter(entry.items()))
                left = {path: state for path, state in paths.items()
                        if not (state in ("deleted", "not in cache") and (kind == "changed outs" or any(
                            out == path or out.startswith(f"{path}/") for out in outputs)))}
                if left:
                    changed.setdefault(stage, []).append({kind: left})
            else:
                changed.setdefault(stage, []).append(entry)
    return changed


def test_a_pristine_clone_shows_no_changed_parameter_or_code(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(PROJECT), str(clone)], tmp_path)
    assert changes_other_than_missing_outputs(clone) == {}
    # What running the stages writes beside the code (Python's bytecode) is no change either.
    run([sys.executable, "-m", "compileall", "-q", "anomaly_pipeline", "stages"], clone)
    assert list((clone / "anomaly_pipeline" / "__pycache__").glob("*.pyc"))
    assert changes_other_than_missing_outputs(clone) == {}


def test_a_committed_own_data_experiment_is_up_to_date_and_reruns_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    write_params(project, {**SMALL, "runs": [0], "train.max_epochs": 1})
    commit_all(project, "a small project")
    images = own_images(tmp_path / "images", 6)
    first = dvc_offline(f"dvc exp run -S data.dir={images} -S data.negative_class=intact "
                        "-S data.positive_class=cracked", project)
    assert "Running stage 'train@0'" in first.stdout
    assert list((project / "anomaly_pipeline" / "__pycache__").glob("*.pyc"))  # Python wrote its bytecode
    commit_all(project, "the experiment")
    assert "Data and pipelines are up to date." in dvc_offline("dvc status", project).stdout
    second = run_offline([*DVC, "repro"], project)
    assert "Running stage" not in second.stdout and "Data and pipelines are up to date." in second.stdout


EDITORS_FILES = ("anomaly_pipeline/.ipynb_checkpoints/model-checkpoint.py", "anomaly_pipeline/model.py~",
                 "anomaly_pipeline/.model.py.swp", "anomaly_pipeline/.DS_Store")


def test_what_running_and_editing_write_beside_the_code_is_not_a_dependency(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    run([*DVC, "repro", "check-params"], project)  # records anomaly_pipeline's hash, Python writing its bytecode
    assert list((project / "anomaly_pipeline" / "__pycache__").glob("*.pyc"))
    for written in EDITORS_FILES:
        (project / written).parent.mkdir(parents=True, exist_ok=True)
        (project / written).write_text("an editor's file\n")
    assert "Data and pipelines are up to date." in run([*DVC, "status", "check-params"], project).stdout
    (project / "anomaly_pipeline" / "model.py").write_text("# a real change\n", "utf-8")
    assert "modified:           anomaly_pipeline" in run([*DVC, "status", "check-params"], project).stdout
