"""check-params: validate params.yaml and the data folder before any stage does work.

Runs first and whenever any parameter changes: an unknown or misspelt key, a value out of range or a
'data.dir' that does not exist stops the pipeline here, with the project's message, before DVC or a
stage reads the data. Its message also says how to get the committed parameters back: `dvc exp run -S` writes
its values into params.yaml, and a failed run leaves them there, so the next run would fail the same way.
"""

from __future__ import annotations

import logging

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.images import class_dirs
from anomaly_pipeline.params import load_params

log = logging.getLogger("anomaly_pipeline.check_params")

UNDO = ("params.yaml keeps this value after a failed run, one that 'dvc exp run -S' set too: fix it, or see what "
        "changed with 'git diff params.yaml' and get the committed parameters back with 'git checkout params.yaml'")


def check() -> None:
    """Validate params.yaml and, unless it is the study's dataset, the data folder's two class folders."""
    params = load_params()
    if params.data.is_study_dataset:
        log.info("params.yaml is valid; data: the study's dataset (fetched by the study-data stage)")
        return
    class_dirs(params.data.dir, params.data.negative_class, params.data.positive_class)
    log.info("params.yaml is valid; data: %s (%s, %s)", params.data.dir, params.data.negative_class,
             params.data.positive_class)


def main() -> None:
    try:
        check()
    except PipelineError as error:
        raise PipelineError(f"{error}\n{UNDO}") from None


if __name__ == "__main__":
    main_guard(main)
