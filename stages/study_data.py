"""study-data: fetch the study's dataset into data/raw, pinned to one upstream commit and checked file by file.

A local copy placed in data/study-dataset/ is used instead of the download. When 'data.dir' points at other
images, nothing is fetched: data/raw then holds only a note saying so. Without network, its message also names
what the training would download (a ResNet's ImageNet weights), so an offline 'dvc repro' stops once.
"""

from __future__ import annotations

import logging

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.files import atomic_dir, write_text_atomic
from anomaly_pipeline.model import weights_to_download
from anomaly_pipeline.params import STUDY_DATA_DIR, load_params
from anomaly_pipeline.study_dataset import MANIFEST, fetch_study_dataset

log = logging.getLogger("anomaly_pipeline.study_data")


def main() -> None:
    params = load_params()
    with atomic_dir(STUDY_DATA_DIR) as out:
        if not params.data.is_study_dataset:
            write_text_atomic(out / "README.txt",
                              f"Not fetched: params.yaml 'data.dir' is {params.data.dir}, not {STUDY_DATA_DIR}.\n"
                              f"Set it back to {STUDY_DATA_DIR} and run 'dvc repro' to fetch the study's dataset.\n")
            log.info("data.dir is %s: the study's dataset is not needed, nothing fetched", params.data.dir)
            return
        count = fetch_study_dataset(out, weights_to_download(params.model.arch, params.model.pretrained))
    log.info("%s: the study's %d images, each matching %s", STUDY_DATA_DIR, count, MANIFEST)


if __name__ == "__main__":
    main_guard(main)
