"""check-params: validate params.yaml and the data folder before any stage does work.

Runs first and whenever any parameter changes: an unknown or misspelt key, a value out of range or a
'data.dir' that does not exist stops the pipeline here, with the project's message, before DVC or a
stage reads the data.
"""

from __future__ import annotations

import logging

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.images import class_dirs
from anomaly_pipeline.params import load_params

log = logging.getLogger("anomaly_pipeline.check_params")


def main() -> None:
    params = load_params()
    if params.data.is_study_dataset:
        log.info("params.yaml is valid; data: the study's dataset (fetched by the study-data stage)")
        return
    class_dirs(params.data.dir, params.data.negative_class, params.data.positive_class)
    log.info("params.yaml is valid; data: %s (%s, %s)", params.data.dir, params.data.negative_class,
             params.data.positive_class)


if __name__ == "__main__":
    main_guard(main)
