"""Shared fixtures: real images that pip installs (the elpv-dataset package's solar cells, scikit-learn's sample
photographs), generated ones where the content does not matter, a throw-away copy of the project as a git + DVC repo.

No test reads ../shared (only the benchmarks do): a user's clone has nothing beside it."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_pipeline.files import sha256_file
from benchmarks.elpv_folders import class_lists, elpv_labels

PROJECT = Path(__file__).resolve().parents[1]
DVC = (sys.executable, "-m", "dvc")
PROJECT_FILES = ("stages", "anomaly_pipeline", "pyproject.toml", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore",
                 "data/.gitignore", "data/study-dataset.sha256")
DVC_FILES = (".dvc/config", ".dvc/plots", ".dvc/plots_page.html")  # copied over what 'dvc init' writes
# Headless Chromium as root with no network: no sandbox, no background requests to Google's hosts.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")

# A small inspection set of real solar cells (elpv-dataset) with byte-identical copies, as the study's set has them:
# 8 distinct clean cells, each twice; 14 distinct faulty cells, two of them four times (16 + 20 files).
ELPV_CLEAN, ELPV_FAULTY = (class_lists(elpv_labels()[1], rare=False, seed=0)[name] for name in ("clean", "faulty"))


def cell_subset(clean: list[str], faulty: list[str], copies: dict[str, int]) -> dict[str, dict[str, str]]:
    """{class folder: {file name: elpv cell}}: every cell once, and ``copies[cell]`` - 1 more byte-identical copies."""
    subset: dict[str, dict[str, str]] = {}
    for class_name, cells in (("clean", clean), ("faulty", faulty)):
        names = subset.setdefault(class_name, {})
        for cell in cells:
            stem = Path(cell).stem
            for copy in range(copies.get(cell, 1)):
                names[f"{stem}.png" if copy == 0 else f"{stem} ({copy}).png"] = cell
    return subset


CELL_SUBSET = cell_subset(ELPV_CLEAN[:8], ELPV_FAULTY[:14],
                          {**dict.fromkeys(ELPV_CLEAN[:8], 2), ELPV_FAULTY[0]: 4, ELPV_FAULTY[1]: 4})


# What this project's development machines set and a user's machine does not: the tests run without them.
MACHINE_ONLY_VARIABLES = ("PYTHONDONTWRITEBYTECODE", "TORCH_HOME")


@pytest.fixture(autouse=True, scope="session")
def users_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test and every command it runs sees a user's fresh machine: Python writes its bytecode, and torch's
    cache (TORCH_HOME) is empty; tests that need a cached file put it into a TORCH_HOME of their own."""
    with pytest.MonkeyPatch.context() as patch:
        for name in MACHINE_ONLY_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))
        yield


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random RGB picture (4x4 random colours, enlarged), the same for the same seed."""
    values = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(values, mode="RGB").resize(size, Image.Resampling.BILINEAR)


def save_image(image: Image.Image, path: Path, **options: object) -> Path:
    """Save an image, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def copy_subset(destination: Path, subset: dict[str, dict[str, str]]) -> Path:
    """Copy the installed elpv cells of ``subset`` ({class: {file name: cell}}) into destination/<class>/<name>."""
    data_dir = elpv_labels()[0]
    for class_name, names in subset.items():
        (destination / class_name).mkdir(parents=True, exist_ok=True)
        for name, cell in names.items():
            shutil.copyfile(data_dir / cell, destination / class_name / name)
    return destination


def subset_paths(subset: dict[str, dict[str, str]]) -> list[str]:
    """The relative paths (class/name) of a subset's files, sorted."""
    return sorted(f"{class_name}/{name}" for class_name, names in subset.items() for name in names)


def own_images(destination: Path, per_class: int, classes: tuple[str, str] = ("intact", "cracked")) -> Path:
    """A user's own folder: ``per_class`` real solar cells in each of two class folders named as the user likes
    (cells that CELL_SUBSET does not use)."""
    subset = {classes[0]: {Path(c).name: c for c in ELPV_CLEAN[-per_class:]},
              classes[1]: {Path(c).name: c for c in ELPV_FAULTY[-per_class:]}}
    return copy_subset(destination, subset)


@pytest.fixture
def cell_images(tmp_path: Path) -> Path:
    """A folder clean/ + faulty/ holding CELL_SUBSET, byte-identical copies included."""
    return copy_subset(tmp_path / "cells", CELL_SUBSET)


@pytest.fixture(scope="module")
def cell_images_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same folder, shared by the tests of one module."""
    return copy_subset(tmp_path_factory.mktemp("cells"), CELL_SUBSET)


# The study's duplicate structure, with generated pictures: 100 clean files of 49 distinct images (48 pairs, one
# group of 4) and 600 faulty files of 525 distinct images (25 groups of 4, 500 singles).
STUDY_LIKE = {"clean": [2] * 48 + [4], "faulty": [4] * 25 + [1] * 500}


def study_like_dataset(root: Path) -> Path:
    """A folder with the study's 700 files and its byte-identical copies (STUDY_LIKE), each distinct image a small
    generated picture: only the split's bookkeeping reads it."""
    seed = 0
    for class_name, group_sizes in STUDY_LIKE.items():
        for group, size in enumerate(group_sizes):
            seed += 1
            first = save_image(picture((8, 8), seed), root / class_name / f"{group}.png")
            for copy in range(1, size):
                shutil.copyfile(first, root / class_name / f"{group} ({copy}).png")
    return root


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it exits non-zero (and check is set)."""
    result = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def init_git(path: Path) -> None:
    run(["git", "init", "-q", "-b", "main"], path)
    run(["git", "config", "user.email", "tests@anomaly-pipeline"], path)
    run(["git", "config", "user.name", "tests"], path)


def commit_all(path: Path, message: str) -> str:
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-q", "-m", message], path)
    return run(["git", "rev-parse", "HEAD"], path).stdout.strip()


def reproduce_and_commit(project: Path, env: dict[str, str] | None = None) -> None:
    """Run ``dvc repro`` once, keep its output in repro.log for the tests that check what ran, and commit."""
    result = run([*DVC, "repro"], project, env)
    (project / "repro.log").write_text(result.stdout + result.stderr)
    commit_all(project, "reproduced")


def make_project(destination: Path) -> Path:
    """A fresh git + DVC repository holding the project's code, dvc.yaml and params.yaml (no outputs)."""
    destination.mkdir(parents=True)
    copy_project_files(destination, PROJECT_FILES)
    init_git(destination)
    run([*DVC, "init", "-q"], destination)
    copy_project_files(destination, DVC_FILES)
    return destination


def copy_project_files(destination: Path, names: tuple[str, ...]) -> None:
    """Copy the project's files and folders ``names`` into ``destination``, as a fresh clone has them."""
    for name in names:
        source = PROJECT / name
        target = destination / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def default_params() -> dict:
    """The project's params.yaml as a dict."""
    import yaml

    return yaml.safe_load((PROJECT / "params.yaml").read_text())


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested mapping with dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_dotted(tree: dict, dotted: str, value: object) -> dict:
    """Set tree['a']['b'] for 'a.b' (in place) and return the tree."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node[key]
    node[leaf] = value
    return tree


SMALL = {
    "runs": [0, 1],
    "model.arch": "resnet18",  # the study's network, random init: quick at 32 px (tests of the default set it)
    "model.pretrained": False,
    "model.image_size": 32,
    "train.batch_size": 8,
    "train.min_epochs": 1,
    "train.max_epochs": 2,
    "train.patience": 1,
    "evaluate.batch_size": 16,
}


# The default network as params.yaml sets it, with its ImageNet weights (pip installed them: no network needed).
DEFAULT_NETWORK = {"model.arch": "efficientnet_lite0", "model.pretrained": True}


def write_params(project: Path, changes: dict[str, object]) -> None:
    """Write params.yaml = the project's defaults with dotted-key changes applied."""
    import yaml

    tree = default_params()
    for dotted, value in changes.items():
        set_dotted(tree, dotted, value)
    (project / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


@functools.cache
def network_cut() -> tuple[tuple[str, ...], dict[str, str]]:
    """How to run a command with no network: a prefix (``unshare -n`` where it works) and environment variables
    (proxies pointing at a closed local port, for where it does not)."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return (unshare, "-n"), {}
    closed = "http://127.0.0.1:9"
    return (), {name: closed for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}


def run_offline(command: list[str], cwd: Path, env: dict[str, str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """``run`` with the network cut for the command."""
    prefix, cut = network_cut()
    return run([*prefix, *command], cwd, {**cut, **(env or {})}, check)


def dvc_offline(command: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True):
    """A README command line (``dvc ...``) run through this interpreter's DVC with the network cut."""
    words = shlex.split(command)
    assert words[0] == "dvc"
    return run_offline([*DVC, *words[1:]], cwd, env, check)


def study_archive(destination: Path, subset: dict[str, dict[str, str]]) -> tuple[str, str]:
    """A stand-in for the study repository's GitHub archive holding ``subset`` under ``<repo>-<commit>/dataset/``;
    returns its file:// URL and the sha256 manifest (``sha256sum`` format)."""
    root = copy_subset(destination / "AnomalyDetection-pinned" / "dataset", subset)
    archive = destination / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root.parent, arcname=root.parent.name)
    return archive.as_uri(), manifest_of(root)


def manifest_of(root: Path) -> str:
    """The sha256 manifest (``sha256sum`` format, as data/study-dataset.sha256) of every file under ``root``."""
    return "".join(sorted(f"{sha256_file(path)}  {path.relative_to(root).as_posix()}\n"
                          for path in root.rglob("*") if path.is_file()))
