"""The decoded-image store: every distinct image of data.dir decoded once per pipeline, at model.image_size, into
one file of uint8 rows (3 x size x size each) that every run reads a batch at a time, never whole.

Rows are read into fresh buffers (not through a memory map, whose pages would count as the process's memory),
so a process holds only the batches it is using: its memory does not grow with the number of images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.files import read_json, sha256_file, write_csv_atomic, write_json_atomic
from anomaly_pipeline.images import class_dirs, list_folder, square_image
from anomaly_pipeline.layout import StoreFiles
from anomaly_pipeline.params import Params

log = logging.getLogger("anomaly_pipeline.store")


def distinct_images(params: Params) -> dict[str, str]:
    """sha256 -> path (relative to data.dir) of every distinct image file in the two class folders."""
    images: dict[str, str] = {}
    for folder in class_dirs(params.data.dir, params.data.negative_class, params.data.positive_class):
        for path in list_folder(folder).images:
            images.setdefault(sha256_file(path), path.relative_to(params.data.dir).as_posix())
    return images


def build_store(params: Params, files: StoreFiles) -> dict:
    """Decode every distinct image once into ``files`` (a new folder); unreadable ones are left out (prepare-split
    reports them, or stops with data.strict). Returns the store's description."""
    size, resize = params.model.image_size, params.model.resize
    digests, skipped = [], []
    with files.images.open("wb") as handle:
        for digest, relative in tqdm(distinct_images(params).items(), desc="decode", unit="img", leave=False,
                                     disable=None):
            try:
                pixels = square_image(params.data.dir / relative, size, resize)
            except PipelineError:
                if params.data.strict:
                    raise
                skipped.append(relative)
                continue
            handle.write(np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes())
            digests.append(digest)
    if not digests:
        raise PipelineError(f"no readable image in {params.data.dir}: nothing to decode")
    if skipped:
        log.warning("%d unreadable image(s) left out (prepare-split lists them), e.g. %s", len(skipped), skipped[0])
    write_csv_atomic(files.index, pd.DataFrame({"sha256": digests}))
    meta = {"images": len(digests), "image_size": size, "resize": resize, "row_bytes": 3 * size * size}
    write_json_atomic(files.meta, meta)
    return meta


class StoredImages:
    """Some of the store's images, in a given order, indexable like a uint8 tensor (N, 3, size, size): indexing
    reads just those rows from disk."""

    def __init__(self, path: Path, rows: np.ndarray, size: int) -> None:
        self.path, self.rows, self.size = path, rows, size
        self.row_bytes = 3 * size * size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: torch.Tensor | slice | list[int]) -> torch.Tensor:
        rows = self.rows[index.numpy() if isinstance(index, torch.Tensor) else index]
        batch = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        with self.path.open("rb", buffering=0) as handle:
            for position, row in enumerate(rows):
                handle.seek(int(row) * self.row_bytes)
                handle.readinto(memoryview(batch[position]))
        return torch.from_numpy(batch).view(len(rows), 3, self.size, self.size)


class ImageStore:
    """The decode stage's store, checked against the image size and resize asked for and against its own size."""

    def __init__(self, size: int, resize: str, files: StoreFiles = StoreFiles()) -> None:
        if not (files.meta.is_file() and files.index.is_file() and files.images.is_file()):
            raise PipelineError(f"the decoded-image store {files.dir} is missing: run 'dvc repro' so the decode "
                                f"stage writes it")
        meta = read_json(files.meta)
        if (meta["image_size"], meta["resize"]) != (size, resize):
            raise PipelineError(f"{files.dir} holds images at {meta['image_size']} px ({meta['resize']}), but "
                                f"params.yaml asks for {size} px ({resize}): run 'dvc repro' so decode runs again")
        expected = meta["images"] * meta["row_bytes"]
        if files.images.stat().st_size != expected:
            raise PipelineError(f"{files.images} is damaged ({files.images.stat().st_size} bytes, expected "
                                f"{expected}): run 'dvc repro', which rebuilds it")
        index = pd.read_csv(files.index, dtype={"sha256": str})["sha256"]
        self.files, self.size = files, size
        self.row_of = {digest: row for row, digest in enumerate(index)}

    def images(self, sha256s: list[str]) -> StoredImages:
        """The images with these content hashes, in this order."""
        missing = [digest for digest in sha256s if digest not in self.row_of]
        if missing:
            raise PipelineError(f"{self.files.dir} has no image with sha256 {missing[0][:12]} (and {len(missing) - 1} "
                                f"more): it is older than the split; run 'dvc repro'")
        return StoredImages(self.files.images, np.array([self.row_of[digest] for digest in sha256s]), self.size)

    def all(self) -> tuple[list[str], StoredImages]:
        """Every image of the store (sha256s in row order, and the images)."""
        digests = list(self.row_of)
        return digests, StoredImages(self.files.images, np.arange(len(digests)), self.size)
