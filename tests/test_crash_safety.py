"""Killed or interrupted stages leave no half-written outputs and the next dvc repro recovers; reruns are bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import DVC, SMALL, commit_all, make_project, run, write_params

# Long: whole pipelines in temporary repositories (python -m pytest -q -m slow tests).
pytestmark = pytest.mark.slow

TIMING_KEYS = ("seconds", "rss", "cuda")


def project_params(data_dir: Path, epochs: int = 4) -> dict[str, object]:
    return {**SMALL, "runs": [0], "data.dir": str(data_dir), "train.max_epochs": epochs, "train.min_epochs": epochs}


@pytest.fixture
def project(tmp_path: Path, cell_images: Path) -> Path:
    path = make_project(tmp_path / "project")
    write_params(path, project_params(cell_images))
    commit_all(path, "project")
    return path


def default_ctrl_c() -> None:
    """Ctrl-C as a terminal delivers it, even where pytest was started in the background by a shell (which sets
    SIGINT to ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_long_repro(project: Path, data_dir: Path) -> subprocess.Popen:
    """Start ``dvc repro`` with a training far too long to end before the test interrupts it."""
    write_params(project, project_params(data_dir, epochs=10_000))
    return subprocess.Popen([*DVC, "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True, preexec_fn=default_ctrl_c)


def read_until(process: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    """Read the process's output until a line holds ``marker``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    process.kill()
    pytest.fail(f"never saw {marker!r} in:\n{''.join(seen)}")


def kill_stage(process: subprocess.Popen, module: str) -> None:
    """SIGKILL the stage's Python process and the shell DVC may have started it through (both name the module
    on their command line; killing only the shell would leave the training running)."""
    stage = [child for child in psutil.Process(process.pid).children(recursive=True)
             if module in " ".join(child.cmdline())]
    if not stage:
        pytest.fail(f"no {module} process under dvc repro")
    for child in reversed(stage):
        child.kill()


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for ``dvc repro`` to exit and return the rest of its output; on timeout kill its whole session so no
    training outlives the test."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def assert_recovers(project: Path, data_dir: Path) -> None:
    """No output of the interrupted run is left half-written, and a plain dvc repro (short training again)
    finishes the job."""
    run_dir = project / "data" / "runs" / "run-0"
    assert not (run_dir / "model").exists() and not (project / "metrics" / "runs" / "run-0.json").exists()
    write_params(project, project_params(data_dir))
    result = run([*DVC, "repro"], project)
    assert "Running stage 'train@0'" in result.stdout and "Running stage 'aggregate'" in result.stdout
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) in ([], [".gitignore"])
    assert json.loads((project / "metrics" / "summary.json").read_text())["runs"] == 1


def test_sigkill_during_training_then_repro_recovers(project: Path, cell_images: Path) -> None:
    process = start_long_repro(project, cell_images)
    read_until(process, "run 0 epoch 2/10000")
    kill_stage(process, "stages.train")
    output = finish(process)
    assert process.returncode != 0, output
    assert_recovers(project, cell_images)


def test_ctrl_c_stops_cleanly_with_a_short_message(project: Path, cell_images: Path) -> None:
    process = start_long_repro(project, cell_images)
    before = read_until(process, "run 0 epoch 1/10000")
    os.killpg(process.pid, signal.SIGINT)
    output = before + finish(process)
    assert process.returncode != 0
    assert "interrupted" in output and "rerun 'dvc repro'" in output
    assert "Traceback" not in output
    assert_recovers(project, cell_images)


def without_timings(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if not any(word in key for word in TIMING_KEYS)}


def test_forced_rerun_is_bit_identical(project: Path) -> None:
    run([*DVC, "repro"], project)
    run_dir = project / "data" / "runs" / "run-0"
    files = ["split/train.csv", "split/val.csv", "split/test.csv", "eval/predictions.csv", "model/model.pt"]
    first = {name: (run_dir / name).read_bytes() for name in files}
    first_metrics = json.loads((project / "metrics" / "runs" / "run-0.json").read_text())
    run([*DVC, "repro", "-f"], project)
    for name in files:
        assert (run_dir / name).read_bytes() == first[name], name
    second_metrics = json.loads((project / "metrics" / "runs" / "run-0.json").read_text())
    assert without_timings(second_metrics) == without_timings(first_metrics)
    assert "test_accuracy" in without_timings(first_metrics)


def test_interrupted_evaluate_keeps_the_previous_outputs_whole(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import stages.evaluate
    from anomaly_pipeline.entry import main_guard

    run([*DVC, "repro"], project)
    eval_dir = project / "data" / "runs" / "run-0" / "eval"
    metrics_file = project / "metrics" / "runs" / "run-0.json"
    before = {path.relative_to(eval_dir): path.read_bytes() for path in eval_dir.rglob("*") if path.is_file()}
    metrics_before = metrics_file.read_bytes()
    copies = []

    def copy_then_interrupt(source: object, target: object) -> None:
        copies.append(target)
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the run's outputs

    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["stages.evaluate", "--run", "0"])
    monkeypatch.setattr(stages.evaluate.shutil, "copy2", copy_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        main_guard(stages.evaluate.main)
    assert exit_info.value.code == 130 and copies, "the run must have misclassified images to copy"
    after = {path.relative_to(eval_dir): path.read_bytes() for path in eval_dir.rglob("*") if path.is_file()}
    assert after == before and metrics_file.read_bytes() == metrics_before
    assert not list(eval_dir.parent.glob(".eval.*.tmp"))
