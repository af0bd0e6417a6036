"""Bad and unusual input files: each is decoded correctly, skipped with a warning, or refused with a clear message."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.images import open_rgb
from anomaly_pipeline.tensors import load_image
import anomaly_pipeline.split as split_module
from anomaly_pipeline.split import (
    group_ids,
    naive_split_leakage,
    near_duplicates,
    scan_dataset,
    split_groups,
)
from tests.conftest import (
    SMALL,
    make_project,
    picture,
    run,
    save_image,
    study_like_dataset,
    write_params,
)


def good_dataset(root: Path, per_class: int = 6) -> Path:
    for offset, class_name in ((0, "clean"), (100, "faulty")):
        for index in range(per_class):
            save_image(picture((24, 24), offset + index), root / class_name / f"{class_name}{index}.png")
    return root


# ---------------------------------------------------------------- decoding unusual but valid images


def test_rgba_is_composited_onto_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(open_rgb(save_image(image, tmp_path / "a.png")))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[4, 4]) == (255, 255, 255)


def test_palette_with_transparency_and_greyscale_and_cmyk(tmp_path: Path) -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(open_rgb(save_image(palette, tmp_path / "p.png")))[0, 0]) == (10, 200, 30)
    grey = open_rgb(save_image(Image.new("L", (8, 8), 90), tmp_path / "g.jpg"))
    assert grey.mode == "RGB" and abs(int(np.asarray(grey)[3, 3, 0]) - 90) <= 2
    cmyk = open_rgb(save_image(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    red = np.asarray(cmyk)[3, 3]
    assert cmyk.mode == "RGB" and red[0] > 200 and red[1] < 60 and red[2] < 60


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    path = save_image(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_rgb(path))[:, :, 0]
    assert rgb.tolist() == [[0, 128], [255, 64]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed portrait
    path = save_image(image, tmp_path / "rotated.jpg", exif=exif)
    assert open_rgb(path).size == (10, 20)


def test_tiny_image_is_resized_up(tmp_path: Path) -> None:
    tensor = load_image(save_image(picture((8, 8), 1), tmp_path / "tiny.png"), 32)
    assert tensor.shape == (3, 32, 32) and tensor.dtype.is_floating_point is False


# ---------------------------------------------------------------- files that cannot be used


def broken_files(class_dir: Path) -> dict[str, str]:
    """Write one file of each unreadable kind; return name -> the words its reason must hold."""
    class_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    picture((64, 64), 7).save(buffer, format="JPEG")
    (class_dir / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (class_dir / "empty.jpg").write_bytes(b"")
    (class_dir / "text.png").write_text("this is not a picture")
    return {"truncated.jpg": "cannot be decoded", "empty.jpg": "empty file", "text.png": "cannot be decoded"}


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = good_dataset(tmp_path)
    expected = broken_files(root / "faulty")
    with caplog.at_level(logging.WARNING):
        table, skipped = scan_dataset(root, "clean", "faulty")
    assert len(table) == 12
    reasons = {Path(item["path"]).name: item["reason"] for item in skipped}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name] and name in reasons[name]
    assert "skipping 3 unreadable image files" in caplog.text and "data.strict: true" in caplog.text


def test_strict_mode_stops_on_unreadable_files(tmp_path: Path) -> None:
    root = good_dataset(tmp_path)
    broken_files(root / "clean")
    with pytest.raises(PipelineError, match=r"3 unreadable image files.*data\.strict: false(.|\n)*truncated\.jpg"):
        scan_dataset(root, "clean", "faulty", strict=True)


def test_decompression_bomb_is_skipped_as_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = good_dataset(tmp_path)
    save_image(Image.new("L", (200, 200)), root / "faulty" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 is over twice the limit
    table, skipped = scan_dataset(root, "clean", "faulty")
    assert [item["path"] for item in skipped] == ["faulty/huge.png"]
    assert "too large to decode safely" in skipped[0]["reason"]
    assert "faulty/huge.png" not in set(table["path"])


def test_hidden_system_and_non_image_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = good_dataset(tmp_path)
    (root / "clean" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "clean" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "clean" / "notes.txt").write_text("shot on monday")
    save_image(picture((8, 8), 3), root / "clean" / ".hidden" / "x.png")
    with caplog.at_level(logging.WARNING):
        table, skipped = scan_dataset(root, "clean", "faulty")
    assert len(table) == 12 and skipped == []
    assert "not images by their extension: clean/notes.txt" in caplog.text
    assert "DS_Store" not in caplog.text and "Thumbs" not in caplog.text


def test_class_with_only_unreadable_files_is_refused(tmp_path: Path) -> None:
    root = good_dataset(tmp_path)
    for path in (root / "faulty").iterdir():
        path.unlink()
    broken_files(root / "faulty")
    with pytest.raises(PipelineError, match=r"faulty holds no readable images"):
        scan_dataset(root, "clean", "faulty")


def test_only_one_class_and_extra_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = good_dataset(tmp_path)
    save_image(picture((8, 8), 5), root / "unsorted" / "u.png")
    with caplog.at_level(logging.WARNING):
        scan_dataset(root, "clean", "faulty")
    assert "not class folders: unsorted" in caplog.text
    for path in (root / "faulty").iterdir():
        path.unlink()
    (root / "faulty").rmdir()
    with pytest.raises(PipelineError, match=r"faulty does not exist \(folders present: \['clean', 'unsorted'\]\)"):
        scan_dataset(root, "clean", "faulty")


def test_stage_reports_a_bad_data_folder_in_one_line(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    write_params(project, {**SMALL, "data.dir": str(tmp_path / "missing")})
    result = run([sys.executable, "-m", "stages.prepare_split", "--run", "0"], project, check=False)
    assert result.returncode == 1
    assert "missing (params.yaml 'data.dir') does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "runs").exists()


# ---------------------------------------------------------------- leakage


def test_naive_split_leaks_a_quarter_of_the_study_test_set(tmp_path: Path) -> None:
    table, _ = scan_dataset(study_like_dataset(tmp_path / "study-like"), "clean", "faulty")
    leaked = [naive_split_leakage(table, 0.3, seed) for seed in range(5)]
    # 210 test images; the study reports about a quarter with a byte-identical twin in training.
    assert all(35 <= count <= 75 for count in leaked), leaked


def test_group_pattern_keeps_a_part_together(tmp_path: Path) -> None:
    root = tmp_path / "parts"
    for part in range(8):
        for shot in range(3):
            for class_name, offset in (("clean", 0), ("faulty", 1000)):
                save_image(picture((16, 16), offset + part * 10 + shot), root / class_name / f"part{part}_shot{shot}.png")
    table, _ = scan_dataset(root, "clean", "faulty")
    groups = group_ids(table, r"^(part\d+)_")
    assert groups.nunique() == 16  # 8 parts per class: the same file name in two class folders is two parts
    assignment = split_groups(table, groups, 0.3, 0.2, np.random.default_rng(0))
    part = table["path"].str.extract(r"^(\w+/part\d+)_")[0]
    assert (assignment.groupby(part).nunique() == 1).all()
    ungrouped = split_groups(table, group_ids(table, ""), 0.3, 0.2, np.random.default_rng(0))
    assert (ungrouped.groupby(part).nunique() > 1).any()


def test_near_duplicates_across_the_split_are_reported(tmp_path: Path) -> None:
    root = good_dataset(tmp_path, per_class=10)
    original = root / "faulty" / "faulty0.png"
    save_image(Image.open(original).convert("RGB"), root / "faulty" / "faulty0-copy.jpg", quality=85)
    table, _ = scan_dataset(root, "clean", "faulty")
    pairs = []
    for seed in range(20):
        assignment = split_groups(table, group_ids(table, ""), 0.3, 0.2, np.random.default_rng(seed))
        sides = {assignment[table["path"] == name].item() for name in ("faulty/faulty0.png", "faulty/faulty0-copy.jpg")}
        if sides == {"train", "test"}:
            pairs = near_duplicates(table, assignment, 3.0)
            break
    assert {frozenset((pair["test"], pair["train"])) for pair in pairs} == {
        frozenset(("faulty/faulty0.png", "faulty/faulty0-copy.jpg"))
    }
    assert near_duplicates(table, assignment, 0) == []


def test_near_duplicates_found_block_by_block_are_those_of_the_whole_matrix(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    table, _ = scan_dataset(good_dataset(tmp_path, per_class=10), "clean", "faulty")
    assignment = split_groups(table, group_ids(table, ""), 0.3, 0.2, np.random.default_rng(0))
    whole = near_duplicates(table, assignment, 200.0)  # a loose limit: many pairs
    assert len(whole) > 10
    monkeypatch.setattr(split_module, "NEAR_DUPLICATE_BLOCK", 2)  # test images two at a time
    assert near_duplicates(table, assignment, 200.0) == whole
