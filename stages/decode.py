"""decode: decode every distinct image of data.dir once, at model.image_size, into the store every run reads.

Runs again only when the images, the class folders, the image size or the resize mode change: a new seed or
any training setting reuses it.
"""

from __future__ import annotations

import logging
import time

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.files import atomic_dir
from anomaly_pipeline.layout import StoreFiles
from anomaly_pipeline.params import load_params
from anomaly_pipeline.store import build_store

log = logging.getLogger("anomaly_pipeline.decode")


def main() -> None:
    params = load_params()
    started = time.perf_counter()
    with atomic_dir(StoreFiles().dir) as out:
        meta = build_store(params, StoreFiles(out))
    log.info("decoded %d distinct images at %d px (%s) into %s, %.0f MB, in %.0f s", meta["images"],
             meta["image_size"], meta["resize"], StoreFiles().images, meta["images"] * meta["row_bytes"] / 2**20,
             time.perf_counter() - started)


if __name__ == "__main__":
    main_guard(main)
