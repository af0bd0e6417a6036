"""What every stage and command runs under: logging, the ``--run`` argument, the error guard, peak memory."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from typing import Any

import psutil

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.params import Params, check_run

log = logging.getLogger("anomaly_pipeline")


def run_arg(description: str, params: Params) -> int:
    """Parse the ``--run N`` argument every per-run stage takes, checked against params.runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=int, required=True, help="run index, one of params.yaml 'runs'")
    return check_run(parser.parse_args().run, params)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main_guard(main: Any) -> None:
    """Run a stage's main(): user errors become one clear line and exit code 1, Ctrl-C exits 130.

    After a successful main() in a process that imported torch, the process ends at once, all output
    flushed, without the interpreter's teardown of torch's modules (0.6 s of every stage here, with
    nothing to write: the stage's outputs are already complete).
    """
    setup_logging()
    try:
        main()
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted; outputs of this stage were not written, rerun 'dvc repro' to resume")
        sys.exit(130)
    if "torch" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
