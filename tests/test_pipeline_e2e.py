"""End to end, for real: the study-data stage fetching a pinned archive, dvc repro, dvc exp run, dvc metrics.

Small settings (2 runs, 1-2 epochs, 32 px, random init) on real solar cells with byte-identical copies
(CELL_SUBSET), served as a file:// stand-in for the study's GitHub archive. The offline walk through the README is in
test_offline.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from anomaly_pipeline.study_dataset import URL_VARIABLE
from tests.conftest import (
    CHROMIUM_FLAGS,
    DVC,
    CELL_SUBSET,
    SMALL,
    commit_all,
    make_project,
    own_images,
    reproduce_and_commit,
    run,
    study_archive,
    subset_paths,
    write_params,
)

# Long: whole pipelines in temporary repositories (python -m pytest -q -m slow tests).
pytestmark = pytest.mark.slow

RUNS = SMALL["runs"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project in a temporary git repo, pinned to a subset of the study's dataset, reproduced once, committed."""
    path = make_project(tmp_path_factory.mktemp("e2e") / "project")
    write_params(path, SMALL)
    url, manifest = study_archive(tmp_path_factory.mktemp("archive"), CELL_SUBSET)
    (path / "data" / "study-dataset.sha256").write_text(manifest)
    commit_all(path, "project pinned to a dataset subset")
    reproduce_and_commit(path, {URL_VARIABLE: url})
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_repro_writes_split_manifests_that_are_disjoint_and_complete(project: Path) -> None:
    for run_index in RUNS:
        split_dir = project / "data" / "runs" / f"run-{run_index}" / "split"
        sides = {side: pd.read_csv(split_dir / f"{side}.csv") for side in ("train", "val", "test")}
        assert list(sides["train"].columns) == ["path", "label", "sha256"]
        paths = pd.concat(frame["path"] for frame in sides.values())
        assert sorted(paths) == subset_paths(CELL_SUBSET)
        hashes = {side: set(frame["sha256"]) for side, frame in sides.items()}
        assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["val"]
        assert not hashes["val"] & hashes["test"]
        for frame in sides.values():
            assert set(frame["label"]) == {0, 1}


def test_repro_writes_sane_run_metrics_and_misclassified_images(project: Path) -> None:
    for run_index in RUNS:
        metrics = read_json(project / "metrics" / "runs" / f"run-{run_index}.json")
        for name in ("train_accuracy", "test_accuracy", "test_balanced_accuracy", "test_precision",
                     "test_recall", "test_f1", "test_specificity", "test_roc_auc"):
            assert 0 <= metrics[name] <= 1, name
        matrix = metrics["confusion_matrix"]
        assert sum(matrix.values()) == metrics["test_images"]
        assert metrics["test_accuracy"] == pytest.approx((matrix["tp"] + matrix["tn"]) / metrics["test_images"], abs=1e-6)
        assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= 2
        assert metrics["train_seconds"] > 0 and metrics["evaluate_seconds"] > 0
        assert metrics["train_peak_rss_mb"] > 100 and metrics["weights"] == "random-init"

        run_dir = project / "data" / "runs" / f"run-{run_index}"
        predictions = pd.read_csv(run_dir / "eval" / "predictions.csv")
        assert len(predictions) == metrics["test_images"]
        assert predictions["score"].between(0, 1).all()
        for folder, count in (("false_positives", matrix["fp"]), ("false_negatives", matrix["fn"])):
            files = sorted((run_dir / "eval" / folder).iterdir())
            copies = [path for path in files if not path.name.endswith(".gradcam.png")]
            assert len(copies) == count
            assert [path.name for path in files if path not in copies] == [f"{p.name}.gradcam.png" for p in copies]
        history = pd.read_csv(run_dir / "model" / "history.csv")
        assert len(history) == metrics["epochs_run"]
        assert history.loc[history["val_loss"].idxmin(), "epoch"] == metrics["best_epoch"]
        assert (run_dir / "model" / "model.pt").stat().st_size > 1_000_000


def test_aggregate_averages_the_runs(project: Path) -> None:
    summary = read_json(project / "metrics" / "summary.json")
    table = pd.read_csv(project / "metrics" / "runs.csv")
    assert summary["runs"] == len(RUNS) == len(table)
    assert summary["weights"] == "random-init"
    for name in ("test_accuracy", "test_precision", "test_recall", "test_f1", "train_seconds"):
        assert summary[name]["mean"] == pytest.approx(table[name].mean(), abs=1e-5)
        assert summary[name]["min"] <= summary[name]["mean"] <= summary[name]["max"]
    assert sum(summary["confusion_matrix_mean"].values()) == pytest.approx(table["test_images"].mean())
    log = (project / "repro.log").read_text()
    assert "test_accuracy" in log and "±" in log and "resnet18, random init weights" in log


def test_second_repro_has_nothing_to_do(project: Path) -> None:
    result = run([*DVC, "repro"], project)
    assert "Data and pipelines are up to date." in result.stdout
    assert "Running stage" not in result.stdout


def test_metrics_show_prints_the_headline_in_a_narrow_table(project: Path) -> None:
    shown = run([*DVC, "metrics", "show"], project, env={"COLUMNS": "160"}).stdout
    assert shown.split()[:7] == ["Path", "accuracy", "balanced_accuracy", "f1", "precision", "recall", "roc_auc"]
    assert "metrics/headline.json" in shown and "metrics/runs/" not in shown
    assert max(len(line) for line in shown.splitlines()) <= 160
    summary, headline = (read_json(project / "metrics" / name) for name in ("summary.json", "headline.json"))
    assert headline["recall"] == pytest.approx(summary["test_recall"]["mean"], abs=1e-4)


PLOT_NAMES = ("Confusion matrix, test images of all runs", "Validation loss per epoch", "Training loss per epoch",
              "ROC curve per run", "Precision-recall curve per run")


def misclassified_total(project: Path) -> int:
    return sum(read_json(project / "metrics" / "runs" / f"run-{r}.json")["confusion_matrix"][cell]
               for r in RUNS for cell in ("fp", "fn"))


def test_every_epoch_of_every_run_is_logged_once_and_gathered_for_the_plots(project: Path) -> None:
    gathered = pd.read_csv(project / "metrics" / "plots" / "history.csv")
    for run_index in RUNS:
        history = pd.read_csv(project / "data" / "runs" / f"run-{run_index}" / "model" / "history.csv")
        epochs = read_json(project / "metrics" / "runs" / f"run-{run_index}.json")["epochs_run"]
        assert history["epoch"].tolist() == list(range(1, epochs + 1))
        assert history["val_loss"].min() == pytest.approx(
            read_json(project / "metrics" / "runs" / f"run-{run_index}.json")["best_val_loss"], abs=1e-6)
        mine = gathered[gathered["run"] == run_index].drop(columns="run").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, history, check_dtype=False)
    assert not (project / "data" / "runs" / "run-0" / "live").exists()


def test_plots_show_renders_every_declared_plot_over_all_runs(project: Path) -> None:
    plots = json.loads(run([*DVC, "plots", "show", "--json"], project).stdout)["data"]
    assert set(PLOT_NAMES) <= set(plots)
    for name in PLOT_NAMES[1:]:
        values = plots[name][0]["content"]["data"]["values"]
        assert {value["run"] for value in values} == {str(r) for r in RUNS}, name
    confusion = plots[PLOT_NAMES[0]][0]["content"]["data"]["values"]
    test_images = sum(read_json(project / "metrics" / "runs" / f"run-{r}.json")["test_images"] for r in RUNS)
    assert len(confusion) == test_images
    assert {value["label"] for value in confusion} == {"clean", "faulty"}


def test_report_holds_summary_runs_curves_and_misclassified_images(project: Path) -> None:
    report = (project / "metrics" / "report.html").read_text()
    for heading in ("Summary over runs", "study (reference)", "95.43 %", "Mean confusion matrix", "Curves",
                    "Misclassified test images"):  # the study's own figures: this project runs on its dataset
        assert heading in report
    assert report.count("<figure>") == misclassified_total(project)
    assert report.count('src="data:image/png;base64,') == 4
    assert report.count('alt="Grad-CAM of ') == misclassified_total(project)
    assert "random-init</b> weights" in report


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium is not installed here (apt-get install chromium); .ci/run installs it")
def test_report_renders_in_headless_chromium(project: Path, tmp_path: Path) -> None:
    page = (project / "metrics" / "report.html").as_uri()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    screenshot = tmp_path / "report.png"
    run(["chromium", *flags, "--window-size=1280,2400", f"--screenshot={screenshot}", page], tmp_path)
    assert screenshot.stat().st_size > 50_000  # a rendered page, not a blank one
    dom = run(["chromium", *flags, "--dump-dom", page], tmp_path).stdout
    assert "Summary over runs" in dom
    assert dom.count("<img") == 4 + 2 * misclassified_total(project)


def test_predict_agrees_with_evaluate_on_the_same_images(project: Path, tmp_path: Path) -> None:
    evaluated = pd.read_csv(project / "data" / "runs" / "run-0" / "eval" / "predictions.csv")
    images = [str(project / "data" / "raw" / path) for path in evaluated["path"]]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    output = tmp_path / "predicted.csv"
    result = run([sys.executable, "-m", "anomaly_pipeline.predict", "--run", "0", "--output", str(output),
                  *images, str(tmp_path)], project)
    predicted = pd.read_csv(output, keep_default_na=False)
    assert "broken.jpg: cannot be decoded" in result.stderr
    assert predicted["path"].tolist() == [*images, str(tmp_path / "broken.jpg")]
    scored = predicted.iloc[:-1]
    assert scored["faulty_probability"].astype(float).to_numpy() == pytest.approx(evaluated["score"].to_numpy(), abs=2e-6)
    assert (scored["label"] == evaluated["predicted"].map({0: "clean", 1: "faulty"})).all()
    assert "faulty_probability" in result.stdout and "clean" in result.stdout
    assert predicted.loc[predicted.index[-1], "label"] == "skipped"


def test_predict_writes_no_file_unless_asked_and_refuses_an_unknown_run(project: Path) -> None:
    before = set(project.iterdir())
    image = str(project / "data" / "raw" / subset_paths(CELL_SUBSET)[0])
    result = run([sys.executable, "-m", "anomaly_pipeline.predict", image], project)
    assert "faulty_probability" in result.stdout and set(project.iterdir()) == before
    refused = run([sys.executable, "-m", "anomaly_pipeline.predict", "--run", "7", image], project, check=False)
    assert refused.returncode == 1
    assert "--run 7 is not one of params.yaml 'runs' [0, 1]" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_matches_pytorch_and_prints_only_the_result(project: Path, fmt: str) -> None:
    result = run([sys.executable, "-m", "anomaly_pipeline.export", "--run", "0", "--format", fmt], project)
    assert (project / "data" / "exports" / "run-0" / f"model.{fmt}").stat().st_size > 1_000_000
    assert "match PyTorch within 1.0e-04" in result.stderr
    assert f"({fmt}, input N x 3 x 32 x 32, RGB, ImageNet-normalised, resize squash)" in result.stderr  # as trained
    assert len((result.stdout + result.stderr).strip().splitlines()) == 1, result.stdout + result.stderr


def test_heatmaps_have_the_image_size_and_differ(project: Path) -> None:
    from PIL import Image

    heatmaps = sorted((project / "data" / "runs").glob("run-*/eval/false_*/*.gradcam.png"))
    assert len(heatmaps) == misclassified_total(project) >= 2
    pixels = []
    for heatmap in heatmaps:
        original = heatmap.with_name(heatmap.name.removesuffix(".gradcam.png"))
        with Image.open(heatmap) as image, Image.open(original) as source:
            assert image.size == source.size
            pixels.append(image.convert("RGB").tobytes())
    assert len(set(pixels)) > 1


def test_exp_run_with_another_seed_reruns_seeded_stages_and_metrics_diff_shows_it(project: Path) -> None:
    before = (project / "data" / "runs" / "run-0" / "split" / "test.csv").read_text()
    result = run([*DVC, "exp", "run", "-S", "seed=3"], project)
    for stage in ("prepare-split@0", "train@1", "evaluate@0", "aggregate"):
        assert f"Running stage '{stage}'" in result.stdout
    assert "Stage 'study-data' didn't change, skipping" in result.stdout
    assert "Stage 'features' didn't change, skipping" in result.stdout
    assert (project / "data" / "runs" / "run-0" / "split" / "test.csv").read_text() != before

    diff = json.loads(run([*DVC, "metrics", "diff", "--all", "--json"], project).stdout)
    assert set(diff) == {"metrics/headline.json"}
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc"):
        assert set(diff["metrics/headline.json"][key]) >= {"old", "new"}
    table = run([*DVC, "metrics", "diff", "--all"], project).stdout
    assert "Change" in table and "accuracy" in table and len(table.splitlines()) <= 20

    experiments = run([*DVC, "exp", "show", "--csv"], project).stdout
    assert "accuracy" in experiments.splitlines()[0] and "seed" in experiments.splitlines()[0]

    plots = json.loads(run([*DVC, "plots", "diff", "HEAD", "--json"], project).stdout)["data"]
    for name in PLOT_NAMES:
        assert set(plots[name][0]["revisions"]) == {"HEAD", "workspace"}, name


def test_own_data_through_one_parameter(project: Path, tmp_path: Path) -> None:
    own = own_images(tmp_path / "my-images", 10)
    run([*DVC, "exp", "run", "-S", f"data.dir={own}", "-S", "data.negative_class=intact",
         "-S", "data.positive_class=cracked"], project)
    predictions = pd.read_csv(project / "data" / "runs" / "run-0" / "eval" / "predictions.csv")
    assert predictions["path"].str.startswith(("intact/", "cracked/")).all()
    assert set(predictions.loc[predictions["path"].str.startswith("cracked/"), "label"]) == {1}
    assert read_json(project / "metrics" / "summary.json")["runs"] == len(RUNS)
    report = (project / "metrics" / "report.html").read_text()
    assert "study (reference)" not in report and "95.43" not in report  # the study's figures belong to its own data
    assert "not fetched" in (project / "data" / "raw" / "README.txt").read_text().lower()
