"""Stage processes: freed memory goes back to the system (glibc's mmap threshold stays fixed), and each
reports its own peak RSS."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

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


# Two epochs of full fine-tuning (one step of 32 images at 224 px each) through a stage's entry point (main_guard);
# prints the page faults of the second epoch's step. With "4k" the process turns transparent huge pages off first.
STEPS = """
import ctypes, resource, sys
import torch
from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.model import build_model
from anomaly_pipeline.training import train_one_epoch

PR_SET_THP_DISABLE = 41

def train():
    if sys.argv[1] == "4k":
        assert ctypes.CDLL("libc.so.6").prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    torch.manual_seed(0)
    model = build_model("resnet18", None).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8), torch.arange(32) % 2
    epoch = lambda: train_one_epoch(model, optimizer, images, labels, 32, torch.device("cpu"), torch.Generator())
    epoch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    epoch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)

main_guard(train)
"""


def faults_per_step(pages: str) -> float:
    return float(subprocess.run([sys.executable, "-c", STEPS, pages], capture_output=True, text=True,
                                check=True).stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file() or
                    "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="the kernel offers no transparent huge pages")
def test_a_training_step_does_not_fault_in_its_memory_4_kib_at_a_time() -> None:
    """Every step maps its activations afresh (they go back to the system when freed): on 2 MiB pages that costs
    a fraction of the page faults, and of the time, that 4 KiB pages cost (issue: training 30 % slower)."""
    huge, small = faults_per_step("huge"), faults_per_step("4k")
    assert small > 200_000  # what a step of 32 at 224 px costs on 4 KiB pages: the comparison means something
    assert huge < small / 3
