"""Shared fixtures: real images from ../shared, a throw-away copy of the project as a git + DVC repo."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_pipeline.files import sha256_file

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ANOMALY_SHARED_DIR", PROJECT.parent / "shared"))
METAL = SHARED / "datasets" / "metal-surface"
FRUIT = SHARED / "datasets" / "fruit"
DVC = (sys.executable, "-m", "dvc")
PROJECT_FILES = ("stages", "anomaly_pipeline", "pyproject.toml", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore",
                 "data/.gitignore", "data/study-dataset.sha256")
DVC_FILES = (".dvc/config", ".dvc/plots", ".dvc/plots_page.html")  # copied over what 'dvc init' writes
# Headless Chromium as root with no network: no sandbox, no background requests to Google's hosts.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")

# A small real subset of metal-surface, chosen to hold byte-identical copies
# ("clean - (1).jpg" = "clean - (2).jpg"; pitted_surface images come in groups of 4).
METAL_SUBSET = {
    "clean": [f"clean - ({n}).jpg" for n in range(1, 17)],
    "faulty": [f"{kind}_{n}.jpg" for kind in ("crazing", "inclusion", "scratches") for n in range(1, 5)]
    + [f"pitted_surface ({n}).jpg" for n in range(1, 9)],
}


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random RGB picture (4x4 random colours, enlarged), the same for the same seed."""
    values = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(values, mode="RGB").resize(size, Image.Resampling.BILINEAR)


def save_image(image: Image.Image, path: Path, **options: object) -> Path:
    """Save an image, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def shared_dataset(path: Path) -> Path:
    if not path.is_dir():
        pytest.fail(f"test data {path} not found: set ANOMALY_SHARED_DIR to the folder holding datasets/")
    return path


def copy_subset(destination: Path, source: Path, subset: dict[str, list[str]]) -> Path:
    """Copy the named images of each class folder into destination/<class>/."""
    for class_name, names in subset.items():
        (destination / class_name).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(source / class_name / name, destination / class_name / name)
    return destination


@pytest.fixture
def metal_subset(tmp_path: Path) -> Path:
    """A folder clean/ + faulty/ holding a small real subset of metal-surface, duplicates included."""
    return copy_subset(tmp_path / "metal", shared_dataset(METAL), METAL_SUBSET)


@pytest.fixture(scope="module")
def metal_subset_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same subset, shared by the tests of one module."""
    return copy_subset(tmp_path_factory.mktemp("metal"), shared_dataset(METAL), METAL_SUBSET)


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
    "model.pretrained": False,
    "model.image_size": 32,
    "train.batch_size": 8,
    "train.min_epochs": 1,
    "train.max_epochs": 2,
    "train.patience": 1,
    "evaluate.batch_size": 16,
}


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


def study_archive(destination: Path, subset: dict[str, list[str]]) -> tuple[str, str]:
    """A stand-in for the study repository's GitHub archive holding ``subset`` of metal-surface under
    ``<repo>-<commit>/dataset/``; returns its file:// URL and the sha256 manifest (``sha256sum`` format)."""
    root = copy_subset(destination / "AnomalyDetection-pinned" / "dataset", shared_dataset(METAL), subset)
    archive = destination / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root.parent, arcname=root.parent.name)
    lines = sorted(f"{sha256_file(root / cls / name)}  {cls}/{name}"
                   for cls, names in subset.items() for name in names)
    return archive.as_uri(), "\n".join(lines) + "\n"
