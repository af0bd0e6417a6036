"""What every stage and command runs under: logging, the ``--run`` argument, the error guard, memory."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import psutil

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.params import Params, check_run

log = logging.getLogger("anomaly_pipeline")

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value
# torch (c10's CPU allocator) aligns blocks of 2 MiB or more to 2 MiB and asks Linux for transparent huge pages.
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def run_arg(description: str, params: Params) -> int:
    """Parse the ``--run N`` argument every per-run stage takes, checked against params.runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=int, required=True, help="run index, one of params.yaml 'runs'")
    return check_run(parser.parse_args().run, params)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB. On Linux the kernel's high-water mark of this
    program (VmHWM): getrusage's ru_maxrss starts from the parent's size at fork (DVC's, a benchmark's)."""
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        kilobytes = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(kilobytes) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def return_freed_memory() -> bool:
    """Make glibc hand every freed block of 128 KiB or more back to the system at once.

    glibc starts with that threshold but raises it each time such a block is freed (up to 32 MB). From then on a
    training step's activations, a few MB each and freed every step, come from the heap, whose holes stay
    resident: measured, about 500 MB of a full fine-tuning process's peak RSS (benchmarks/README.md). Fixing the
    threshold changes where tensors live, not what is computed. Returns whether it applied (Linux with glibc).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def use_huge_pages() -> None:
    """Have torch back its tensors of 2 MiB or more with transparent huge pages (Linux; elsewhere it does nothing).

    Memory handed back to the system (``return_freed_memory``) is mapped afresh by every training step: on 4 KiB
    pages that is some 500,000 page faults a step at 224 px, a third more time per epoch; on 2 MiB pages, about a
    sixth as many (benchmarks/README.md). Applies to tensors allocated after the call.
    """
    os.environ[HUGE_PAGES_VARIABLE] = "1"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main_guard(main: Any) -> None:
    """Run a stage's main(): user errors become one clear line and exit code 1, Ctrl-C exits 130.

    After a successful main() in a process that imported torch, the process ends at once, all output
    flushed, without the interpreter's teardown of torch's modules (0.6 s of every stage here, with
    nothing to write: the stage's outputs are already complete).
    """
    setup_logging()
    return_freed_memory()
    use_huge_pages()
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
