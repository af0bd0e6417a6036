"""The study's dataset, pinned: its GitHub archive at a fixed commit (folder ``dataset/``), every file checked
against data/study-dataset.sha256, so every clone gets the same 700 images (and DVC the same md5)."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.files import sha256_file
from anomaly_pipeline.params import OWN_DATA_COMMAND

log = logging.getLogger("anomaly_pipeline.study_data")

REPOSITORY = "https://github.com/mhkt19/AnomalyDetection"


COMMIT = "13887447bbaf77ab659e925222df0f6d696a3988"


ARCHIVE_URL = f"{REPOSITORY}/archive/{COMMIT}.tar.gz"


SOURCE_FOLDER = "dataset"


MANIFEST = Path("data/study-dataset.sha256")


LOCAL_COPY = Path("data/study-dataset")


# Tests and mirrors point the download elsewhere (any URL urllib opens, file:// included).
URL_VARIABLE = "ANOMALY_STUDY_DATASET_URL"


TIMEOUT_SECONDS = 30


def read_checksums(path: Path = MANIFEST) -> dict[str, str]:
    """relative path -> sha256 of every file of the pinned dataset (``sha256sum`` format)."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing: it pins the study's dataset; restore it with 'git checkout {path}'")
    entries = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        entries[name] = digest
    return entries


def unreachable_message(reason: str, also_needed: str | None = None) -> str:
    """The one message for a machine without network: every download the pipeline needs, and the ways around."""
    message = (
        f"the study's dataset could not be downloaded: its images come from GitHub, {REPOSITORY} at commit "
        f"{COMMIT[:8]} (folder {SOURCE_FOLDER}/), and the network is unreachable ({reason}). Two ways on:\n"
        f"  1. your own images (one subfolder per class):\n"
        f"       {OWN_DATA_COMMAND}\n"
        f"  2. a local copy of the study's dataset: put its clean/ and faulty/ folders into {LOCAL_COPY}/ "
        f"(700 images, checked against {MANIFEST}) and run 'dvc repro' again"
    )
    if also_needed:
        message += f"\nThe training will need the network too, for {also_needed}"
    return message


def download(url: str, folder: Path, also_needed: str | None) -> Path:
    """Download the repository archive at the pinned commit and unpack its dataset folder; returns that folder."""
    archive = folder / "archive.tar.gz"
    log.info("downloading the study's dataset from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, archive.open("wb") as handle:
            shutil.copyfileobj(response, handle)
    except (urllib.error.URLError, OSError) as error:
        raise PipelineError(unreachable_message(str(getattr(error, "reason", error)), also_needed)) from error
    unpacked = folder / "unpacked"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and SOURCE_FOLDER in PurePosixPath(m.name).parts[1:2]]
        tar.extractall(unpacked, members=members, filter="data")
    tops = [path for path in unpacked.iterdir() if (path / SOURCE_FOLDER).is_dir()] if unpacked.is_dir() else []
    if not tops:
        raise PipelineError(f"{url} holds no {SOURCE_FOLDER}/ folder: it is not the study's repository archive")
    return tops[0] / SOURCE_FOLDER


def copy_checked(source: Path, manifest: dict[str, str], destination: Path) -> None:
    """Copy every file the manifest names from ``source`` to ``destination``, each checked against its sha256."""
    missing = [name for name in manifest if not (source / name).is_file()]
    changed = [name for name in manifest if name not in missing and sha256_file(source / name) != manifest[name]]
    if missing or changed:
        listed = ", ".join((missing + changed)[:5])
        raise PipelineError(f"{source} is not the pinned study dataset: {len(missing)} files missing and "
                            f"{len(changed)} different from {MANIFEST} (e.g. {listed})")
    for name in manifest:
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, destination / name)


def fetch_study_dataset(destination: Path, also_needed: str | None = None) -> int:
    """The pinned images into ``destination``: from the local copy data/study-dataset/ when there is one, else
    downloaded (``ANOMALY_STUDY_DATASET_URL`` overrides the URL); returns how many files. ``also_needed`` names
    what later stages will download, for the message when the network is unreachable."""
    manifest = read_checksums()
    if LOCAL_COPY.is_dir():
        log.info("using the local copy %s", LOCAL_COPY)
        copy_checked(LOCAL_COPY, manifest, destination)
    else:
        with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
            source = download(os.environ.get(URL_VARIABLE, ARCHIVE_URL), Path(scratch), also_needed)
            copy_checked(source, manifest, destination)
    return len(manifest)
