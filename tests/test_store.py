"""The decoded-image store: the same pixels as decoding each file, read a batch at a time, built once per pipeline,
rebuilt when what it depends on changes or when it is damaged, never used when it does not fit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.layout import StoreFiles
from anomaly_pipeline.params import parse_params
from anomaly_pipeline.store import ImageStore, build_store, distinct_images
from anomaly_pipeline.tensors import load_image
from tests.conftest import DVC, SMALL, commit_all, default_params, make_project, reproduce_and_commit, run, set_dotted
from tests.conftest import write_params


def store_for(data_dir: Path, folder: Path, size: int = 32, resize: str = "squash") -> StoreFiles:
    tree = default_params()
    for dotted, value in {"data.dir": str(data_dir), "model.image_size": size, "model.resize": resize}.items():
        set_dotted(tree, dotted, value)
    files = StoreFiles(folder)
    folder.mkdir()
    build_store(parse_params(tree), files)
    return files


def test_stored_images_are_the_decoded_files_in_any_order(cell_images: Path, tmp_path: Path) -> None:
    files = store_for(cell_images, tmp_path / "store", resize="pad")
    store = ImageStore(32, "pad", files)
    paths = {digest: cell_images / relative for digest, relative in
             distinct_images(parse_params(set_dotted(default_params(), "data.dir", str(cell_images)))).items()}
    assert len(store.row_of) == len(paths) < sum(1 for _ in cell_images.rglob("*.png"))  # duplicates once
    order = list(reversed(paths))
    images = store.images(order)
    assert len(images) == len(order)
    expected = torch.stack([load_image(paths[digest], 32, "pad") for digest in order])
    assert torch.equal(images[torch.arange(len(order))], expected)
    assert torch.equal(images[2:5], expected[2:5])
    assert torch.equal(images[torch.tensor([4, 0, 4])], expected[[4, 0, 4]])
    with pytest.raises(PipelineError, match="has no image with sha256"):
        store.images(["0" * 64])


def test_a_store_that_does_not_fit_is_never_used(cell_images: Path, tmp_path: Path) -> None:
    files = store_for(cell_images, tmp_path / "store")
    with pytest.raises(PipelineError, match=r"holds images at 32 px \(squash\), but params.yaml asks for 64 px"):
        ImageStore(64, "squash", files)
    with pytest.raises(PipelineError, match="asks for 32 px \\(pad\\)"):
        ImageStore(32, "pad", files)
    with files.images.open("r+b") as handle:
        handle.truncate(files.images.stat().st_size - 10)
    with pytest.raises(PipelineError, match=rf"{re.escape(str(files.images))} is damaged .* run 'dvc repro'"):
        ImageStore(32, "squash", files)
    files.images.unlink()
    with pytest.raises(PipelineError, match="is missing: run 'dvc repro'"):
        ImageStore(32, "squash", files)


def stage_ran(log: str, stage: str) -> bool:
    return f"Running stage '{stage}'" in log


def store_restored(log: str) -> bool:
    """decode ran again, or DVC restored its outputs from its cache (same command, data and parameters)."""
    return stage_ran(log, "decode") or "Stage 'decode' is cached - skipping run, checking out outputs" in log


@pytest.mark.slow
def test_decode_runs_once_per_pipeline_and_again_only_when_its_inputs_change(cell_images: Path,
                                                                            tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    changes = {**SMALL, "data.dir": str(cell_images)}
    write_params(project, changes)
    commit_all(project, "small")
    reproduce_and_commit(project)
    assert stage_ran((project / "repro.log").read_text(), "decode")
    images = project / "data" / "decoded" / "images.u8"
    size = images.stat().st_size

    # A new seed: new splits and models from the same store.
    log = run([*DVC, "exp", "run", "-S", "seed=3"], project).stdout
    assert stage_ran(log, "train@0") and not stage_ran(log, "decode")

    # A damaged store is rebuilt, not used.
    with images.open("r+b") as handle:
        handle.truncate(size // 2)
    assert "changed outs" in run([*DVC, "status", "decode"], project).stdout
    log = run([*DVC, "repro"], project).stdout
    assert store_restored(log) and images.stat().st_size == size
    assert "up to date" in run([*DVC, "status"], project).stdout

    # Another image size: decoded again, at that size.
    write_params(project, {**changes, "model.image_size": 48})
    log = run([*DVC, "repro", "decode"], project).stdout
    assert stage_ran(log, "decode") and images.stat().st_size == size // (32 * 32) * (48 * 48)

    # A missing store is rebuilt.
    images.unlink()
    assert store_restored(run([*DVC, "repro", "decode"], project).stdout) and images.is_file()
