"""Stage processes: freed memory goes back to the system (glibc's mmap threshold stays fixed), and each
reports its own peak RSS."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

# Frees a 16 MB block (glibc then raises its mmap threshold to 16 MB), allocates 4 MB and prints how many MB of
# it glibc mapped on its own (returned to the system when freed) rather than carving it from the heap.
CHECK = """
import ctypes, sys
import numpy as np
from anomaly_pipeline.entry import main_guard, return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def check():
    np.ones(16 << 20, dtype=np.uint8)
    before = libc.mallinfo2().hblkhd
    block = np.ones(4 << 20, dtype=np.uint8)
    print((libc.mallinfo2().hblkhd - before) >> 20, flush=True)

if sys.argv[1] == "stage":
    main_guard(check)
else:
    check()
"""


def mapped_mb(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True,
                              check=True).stdout.split()[-1])


def test_glibc_alone_keeps_freed_blocks_on_the_heap() -> None:
    assert mapped_mb("plain") == 0  # what return_freed_memory exists for


def test_every_stage_returns_freed_blocks_to_the_system() -> None:
    assert mapped_mb("stage") == 4


def test_a_stage_reports_its_own_peak_not_its_parents() -> None:
    """DVC starts the stages: a child's peak RSS must not start from its parent's size (getrusage's does)."""
    parent_ballast = np.ones(400 << 20, dtype=np.uint8)
    code = "from anomaly_pipeline.entry import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert parent_ballast.sum() == 400 << 20
    assert float(child.stdout) < 200
