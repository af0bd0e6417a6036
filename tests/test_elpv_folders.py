"""The elpv script: class folders from the installed elpv-dataset package, and its seeded rare-defect variant."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.elpv_folders import elpv_labels
from tests.conftest import PROJECT


def lay_out(out_dir: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.elpv_folders", str(out_dir), *options], cwd=PROJECT,
                          capture_output=True, text=True)


def listing(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def labels() -> tuple[Path, pd.DataFrame]:
    return elpv_labels()


def test_clean_is_probability_0_faulty_is_two_thirds_or_more_and_files_are_copied_unchanged(
        tmp_path: Path, labels: tuple[Path, pd.DataFrame]) -> None:
    data_dir, table = labels
    result = lay_out(tmp_path / "elpv")
    assert result.returncode == 0, result.stderr
    names = {name: {Path(path).name for path in table.loc[mask, "path"]}
             for name, mask in (("clean", table["probability"] == 0), ("faulty", table["probability"] > 0.5),
                                ("ambiguous", (table["probability"] > 0) & (table["probability"] < 0.5)))}
    assert len(names["ambiguous"]) > 0
    clean, faulty = listing(tmp_path / "elpv" / "clean"), listing(tmp_path / "elpv" / "faulty")
    assert set(clean) == names["clean"] and set(faulty) == names["faulty"]
    assert f"{len(clean)} clean, {len(faulty)} faulty" in result.stdout
    first = sorted(faulty)[0]
    assert faulty[first] == hashlib.sha256((data_dir / "images" / first).read_bytes()).hexdigest()


def test_rare_variant_keeps_every_clean_cell_and_a_seeded_tenth_as_many_faulty(tmp_path: Path) -> None:
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert lay_out(tmp_path / name, "--rare", "--seed", seed).returncode == 0
    full = tmp_path / "full"
    assert lay_out(full).returncode == 0
    clean, faulty = listing(tmp_path / "a" / "clean"), listing(tmp_path / "a" / "faulty")
    assert clean == listing(full / "clean")
    assert len(faulty) == round(0.1 * len(clean)) and set(faulty) < set(listing(full / "faulty"))
    assert faulty == listing(tmp_path / "b" / "faulty")
    assert faulty != listing(tmp_path / "c" / "faulty")


def test_a_folder_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = lay_out(tmp_path / "out")
    assert result.returncode != 0 and "is not empty" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
