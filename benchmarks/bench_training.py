"""Training and evaluation speed and memory: this project's loop against the study's, on the same images.

    python -m benchmarks.bench_training ../shared/datasets/metal-surface [--epochs 2] [--repeats 3] [--image-size 224]

Each loop runs in its own process (so peak RSS is its own) on run 0's split of the data, random
initialisation, batch 32, Adam 1e-3; the loops take turns, ``--repeats`` rounds, and each figure is the median
over the rounds with its spread (lowest-highest). A process's seconds per epoch are those of its epochs after the
first (the first also pays for warm-up). It refuses to time a busy machine (load average above 1.5) unless
``--busy`` is given, and then flags the figures. Printed per loop: seconds per epoch, page faults per training step
after the first epoch, images/s for training and evaluation, training GFLOP/s (FlopCounterMode) against the CPU's
fp32 matmul GFLOP/s, the estimated seconds of a whole run (epochs x epoch time + evaluation + image copying) and
peak RSS; then the ratios (per round, study's loop / ours),
what each part of each loop adds to its peak RSS (imports, data, model, first epoch, later epochs,
evaluation), what importing the train stage's libraries costs, where a training step of this project's loop
spends its time (torch.profiler: data, forward, backward, optimizer; convolution, batch norm, ...) and what
its memory holds.

The baseline follows the study's loop as its description gives it: every image decoded and resized from
disk in every epoch, NCHW training, evaluation one image at a time, every split image copied into the
run folder. This project's loop, as its stages run it: images decoded once into the decode stage's store and
read a batch at a time, channels_last, batched evaluation under inference_mode, only misclassified images
copied, freed memory handed back to the system and large blocks on transparent huge pages
(anomaly_pipeline.entry). Two more loops show what that allocator setting is worth: ``ours-4k`` hands freed
memory back on 4 KiB pages (main before huge pages), ``ours-heap`` leaves glibc as it is (freed blocks stay on the
heap).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from anomaly_pipeline.entry import peak_rss_mb, return_freed_memory, use_huge_pages
from anomaly_pipeline.images import IMAGENET_MEAN, IMAGENET_STD
from anomaly_pipeline.model import LITE0, build_model, predict_scores, seed_everything
from anomaly_pipeline.layout import StoreFiles
from anomaly_pipeline.params import PARAMS_FILE, Params, parse_params
from anomaly_pipeline.split import make_split
from anomaly_pipeline.store import ImageStore, build_store
from anomaly_pipeline.tensors import load_images, normalize
from anomaly_pipeline.training import train_one_epoch
from benchmarks.machine import QUIET_LOAD, load_average, machine

PROJECT = Path(__file__).resolve().parents[1]

BATCH = 32
EPOCHS_PER_RUN = 13.8  # mean epochs of the recorded 10-run result (metrics/summary.json, random init)
# How each loop's process gets its memory: study = glibc as it is (the study's code does nothing about it).
LOOPS = {"study": "glibc as it is", "ours": "as the stages: freed memory returned, huge pages",
         "ours-4k": "freed memory returned on 4 KiB pages", "ours-heap": "glibc as it is",
         "lite0": "as the stages, EfficientNet-Lite0 instead of ResNet18"}


def loop_arch(loop: str) -> str:
    return LITE0 if loop == "lite0" else "resnet18"


class EpochClock:
    """Seconds and minor page faults of each epoch of a loop; ``later`` summarises the epochs after the first."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches, self.seconds, self.faults = batches_per_epoch, [], []

    def epoch(self, train: Callable[[], object]) -> None:
        faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        train()
        self.seconds.append(time.perf_counter() - started)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    def later(self) -> dict[str, float]:
        """Median seconds per epoch and page faults per training step, over the epochs after the first."""
        seconds, faults = self.seconds[1:] or self.seconds, self.faults[1:] or self.faults
        return {"epoch_s": statistics.median(seconds), "faults_per_step": statistics.median(faults) / self.batches}


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 matrix-multiply throughput of this CPU with torch's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def training_flops_per_image(size: int, arch: str = "resnet18") -> float:
    """FLOPs of one training step per image: 3 x the forward pass that torch counts (the backward pass costs about
    twice the forward; torch's counter is not used for it, as it counts a depthwise convolution's backward as a dense
    one's: 32 GFLOP an image for Lite0)."""
    model = build_model(arch, None)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, size, size))
    return 3 * counter.get_total_flops() / 2


def split(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run 0's train and test manifests (path relative to data_dir, label, sha256), as prepare-split makes them
    with params.yaml's class names and ratios."""
    manifests, _ = make_split(bench_params(data_dir), 0)
    return manifests["train"], manifests["test"]


def bench_params(data_dir: Path, size: int | None = None) -> Params:
    """params.yaml with data.dir set to the benchmark's images (and model.image_size to ``size``, if given)."""
    tree = yaml.safe_load((PROJECT / PARAMS_FILE).read_text())
    tree["data"]["dir"] = str(data_dir)
    if size is not None:
        tree["model"]["image_size"] = size
    return parse_params(tree)


class MemoryTrace:
    """Peak RSS of this process at named points of a loop, and what each part added (MB)."""

    def __init__(self) -> None:
        self.points: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.points[name] = peak_rss_mb()

    def added(self) -> dict[str, float]:
        values = list(self.points.values())
        return {name: value - previous for name, value, previous in zip(self.points, values, [0.0, *values])}


def ours(data_dir: Path, epochs: int, size: int, loop: str = "ours") -> dict:
    """This project's loop: the decode stage's store (anomaly_pipeline.store), read a batch at a time by
    anomaly_pipeline.training, as the train and evaluate stages do; ``loop`` says how the process gets its memory
    (LOOPS: 'ours' as every stage)."""
    if loop in ("ours", "ours-4k", "lite0"):
        return_freed_memory()
    if loop in ("ours", "lite0"):
        use_huge_pages()
    trace = MemoryTrace()
    trace.mark("process, imports")
    params = bench_params(data_dir, size)
    manifests, _ = make_split(params, 0)
    train, test = manifests["train"], manifests["test"]
    seed_everything(0)
    with tempfile.TemporaryDirectory() as folder:
        files = StoreFiles(Path(folder))
        started = time.perf_counter()
        build_store(params, files)
        decode = time.perf_counter() - started
        store = ImageStore(size, "squash", files)
        images, labels = store.images(train["sha256"].tolist()), torch.tensor(train["label"].tolist())
        trace.mark("data")
        model = build_model(loop_arch(loop), None).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
        trace.mark("model")
        clock = EpochClock(math.ceil(len(images) / BATCH))
        for _ in range(epochs):
            clock.epoch(lambda: train_one_epoch(model, optimizer, images, labels, BATCH, cpu, generator))
            if len(clock.seconds) == 1:
                trace.mark("first epoch")
        trace.mark("later epochs")
        started = time.perf_counter()
        predict_scores(model, store.images(test["sha256"].tolist()), 64, cpu, normalize)
        evaluate = time.perf_counter() - started
        trace.mark("evaluation")
    return {"train_images": len(train), "test_images": len(test), "decode_s": decode, **clock.later(),
            "evaluate_s": evaluate, "copy_s": 0.0, "peak_rss_mb": peak_rss_mb(), "memory_mb": trace.added()}


OP_GROUPS = (("convolution", ("conv",)), ("batch norm", ("batch_norm", "batchnorm")),
             ("relu, pooling, add", ("relu", "pool", "add_", "threshold")),
             ("optimizer (Adam)", ("_foreach", "optimizer.", "adam", "lerp", "addcdiv", "sqrt")),
             ("memory fills", ("fill_", "zero_")))


def profile(data_dir: Path, epochs: int, size: int) -> dict:
    """Where one training step of this project's loop spends its time: phases, and operator groups."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    return_freed_memory()
    use_huge_pages()
    train, _ = split(data_dir)
    seed_everything(0)
    images = load_images(data_dir, train["path"].tolist()[:BATCH * 4], size)
    labels = torch.tensor(train["label"].tolist()[:BATCH * 4])
    model = build_model("resnet18", None).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cpu = torch.device("cpu")

    def step(index: slice) -> None:
        with record_function("phase: data"):
            inputs, targets = normalize(images[index], cpu), labels[index]
        optimizer.zero_grad(set_to_none=True)
        with record_function("phase: forward"):
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: optimizer"):
            optimizer.step()

    before_training = peak_rss_mb()
    saved: dict[int, int] = {}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor):
        step(slice(0, BATCH))  # warm-up; the tensors autograd keeps for the backward pass are counted
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = {"peak before training": before_training, "peak after one step": peak_rss_mb(),
              "weights + grads + Adam state": 4 * parameters / 2**20,
              "tensors kept for backward": sum(saved.values()) / 2**20}
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for start in range(BATCH, len(images), BATCH):
            step(slice(start, start + BATCH))
    events = profiler.key_averages()
    phases = {event.key[len("phase: "):]: event.cpu_time_total for event in events if event.key.startswith("phase: ")}
    groups = dict.fromkeys([name for name, _ in OP_GROUPS] + ["other"], 0.0)
    for event in events:
        if event.key.startswith("phase: "):
            continue
        name = next((group for group, words in OP_GROUPS if any(word in event.key.lower() for word in words)), "other")
        groups[name] += event.self_cpu_time_total
    return {"phases": phases, "operators": groups, "memory_mb": memory}


def baseline(data_dir: Path, epochs: int, size: int) -> dict:
    """The study's loop: decode every epoch, NCHW, one-image evaluation, every split image copied; glibc's
    allocator as it is."""
    from PIL import Image
    from torchvision import transforms

    trace = MemoryTrace()
    trace.mark("process, imports")
    train, test = split(data_dir)
    train_paths, train_labels, test_paths = train["path"].tolist(), train["label"].tolist(), test["path"].tolist()
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class Folder(torch.utils.data.Dataset):
        def __init__(self, paths: list[str], labels: list[int]) -> None:
            self.paths, self.labels = paths, labels

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return transform(Image.open(data_dir / self.paths[index]).convert("RGB")), self.labels[index]

    seed_everything(0)
    loader = torch.utils.data.DataLoader(Folder(train_paths, train_labels), batch_size=BATCH, shuffle=True)
    trace.mark("data")
    model = build_model("resnet18", None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trace.mark("model")

    def train_epoch() -> None:
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()

    clock = EpochClock(len(loader))
    for _ in range(epochs):
        clock.epoch(train_epoch)
        if len(clock.seconds) == 1:
            trace.mark("first epoch")
    trace.mark("later epochs")
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for path in test_paths:
            model(transform(Image.open(data_dir / path).convert("RGB")).unsqueeze(0))
    evaluate = time.perf_counter() - started
    trace.mark("evaluation")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_folder:
        for path in train_paths + test_paths:
            target = Path(run_folder) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data_dir / path, target)
    copy = time.perf_counter() - started
    return {"train_images": len(train_paths), "test_images": len(test_paths), "decode_s": 0.0, **clock.later(),
            "evaluate_s": evaluate, "copy_s": copy, "peak_rss_mb": peak_rss_mb(), "memory_mb": trace.added()}


IMPORT_STEPS = (("python, pydantic, psutil (anomaly_pipeline.entry)", []), ("numpy", ["numpy"]),
                ("torch", ["torch"]), ("torchvision", ["torchvision"]),
                ("the train stage's other imports", ["stages.train"]))


def import_costs() -> dict[str, float]:
    """Peak RSS of a fresh process after each step of what the train stage imports, and what each step adds."""
    costs, previous, modules = {}, 0.0, []
    for name, more in IMPORT_STEPS:
        modules += more
        code = "".join(f"import {module}\n" for module in modules) + (
            "from anomaly_pipeline.entry import peak_rss_mb\nprint(peak_rss_mb())")
        peak = float(subprocess.run([sys.executable, "-c", code], cwd=PROJECT, check=True, capture_output=True,
                                    text=True).stdout)
        costs[name], previous = peak - previous, peak
    return costs


def share_line(times: dict[str, float]) -> str:
    total = sum(times.values())
    return ", ".join(f"{name} {100 * value / total:.0f}%" for name, value in times.items())


def measure(loop: str, data_dir: Path, epochs: int, size: int) -> dict:
    """Run one loop in a fresh process and return its figures."""
    output = subprocess.run([sys.executable, "-m", "benchmarks.bench_training", str(data_dir), "--loop", loop,
                             "--epochs", str(epochs), "--image-size", str(size)], cwd=PROJECT, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


def spread(values: list[float], digits: int) -> str:
    """Median and lowest-highest of ``values``."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def commit() -> str:
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=PROJECT, capture_output=True,
                               text=True)
    return described.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder with clean/ and faulty/")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loop; those after the first are timed")
    parser.add_argument("--repeats", type=int, default=3, help="rounds in which every loop runs once, in turn")
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=[loop for loop in LOOPS if loop != "lite0"],
                        help="loops to compare (lite0: the same loop as ours with EfficientNet-Lite0)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--busy", action="store_true", help="time even a busy machine (the figures are flagged)")
    parser.add_argument("--loop", choices=(*LOOPS, "profile"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        figures = (profile(args.data_dir, args.epochs, args.image_size) if args.loop == "profile" else
                   baseline(args.data_dir, args.epochs, args.image_size) if args.loop == "study" else
                   ours(args.data_dir, args.epochs, args.image_size, args.loop))
        print(json.dumps(figures))
        return
    load = load_average()
    if load > QUIET_LOAD and not args.busy:
        sys.exit(f"load average {load:.2f} is above {QUIET_LOAD}: timings now would not be comparable. Wait for a "
                 f"quiet machine, or pass --busy to take them anyway (flagged)")
    flag = f"BUSY MACHINE (load average {load:.2f} at the start): the timings are not comparable. " if (
        load > QUIET_LOAD) else ""
    matmul = matmul_gflops()
    flops = training_flops_per_image(args.image_size)
    loop_flops = {loop: training_flops_per_image(args.image_size, loop_arch(loop)) for loop in args.loops}
    print(f"{flag}{datetime.date.today()}, commit {commit()}, {machine()}, load average {load:.2f} at the start")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.image_size} px, batch {BATCH}, "
          f"random init; fp32 matmul 2048^2: {matmul:.1f} GFLOP/s; ResNet18 training step: "
          f"{flops / 1e9:.2f} GFLOP/image; {args.repeats} rounds, the loops in turn")
    rounds: dict[str, list[dict]] = {loop: [] for loop in args.loops}
    for _ in range(args.repeats):
        for loop in args.loops:
            rounds[loop].append(measure(loop, args.data_dir, args.epochs, args.image_size))
    print(f"{'loop':<10}{'s/epoch':>20}{'faults/step':>13}{'peak MB':>21}{'train img/s':>12}{'eval img/s':>11}"
          f"{'% matmul':>9}{'s/run*':>8}  memory")
    for loop, results in rounds.items():
        for figures in results:
            figures["run_s"] = (figures["decode_s"] + EPOCHS_PER_RUN * figures["epoch_s"] + figures["evaluate_s"]
                                + figures["copy_s"])
        median = {key: statistics.median(figures[key] for figures in results)
                  for key in ("epoch_s", "faults_per_step", "evaluate_s", "run_s")}
        train_rate = results[0]["train_images"] / median["epoch_s"]
        print(f"{loop:<10}{spread([f['epoch_s'] for f in results], 1):>20}{median['faults_per_step']:>13,.0f}"
              f"{spread([f['peak_rss_mb'] for f in results], 0):>21}{train_rate:>12.2f}"
              f"{results[0]['test_images'] / median['evaluate_s']:>11.1f}"
              f"{100 * train_rate * loop_flops[loop] / 1e9 / matmul:>8.0f}%{median['run_s']:>8.0f}  {LOOPS[loop]}")
    if "study" in rounds:
        study = rounds["study"]
        for loop in (name for name in rounds if name != "study"):
            epoch = [base["epoch_s"] / figures["epoch_s"] for base, figures in zip(study, rounds[loop])]
            memory = [figures["peak_rss_mb"] / base["peak_rss_mb"] for base, figures in zip(study, rounds[loop])]
            print(f"{loop} against the study's loop, per round: per-epoch speed {spread(epoch, 2)}x, "
                  f"peak RSS {spread(memory, 2)}x of the study's")
    for loop, results in rounds.items():
        print(f"peak RSS of {loop} (last round), MB added by each part: " + ", ".join(
            f"{name} {value:+.0f}" for name, value in results[-1]["memory_mb"].items()))
    print("peak RSS of a process importing what the train stage imports, MB added by each: " + ", ".join(
        f"{name} {value:+.0f}" for name, value in import_costs().items()))
    breakdown = measure("profile", args.data_dir, args.epochs, args.image_size)
    print("where a training step of ours goes (torch.profiler, 3 batches): "
          + share_line(breakdown["phases"]) + "; by operator: " + share_line(breakdown["operators"]))
    print(f"memory of ours, batch {BATCH}, MB: " + ", ".join(f"{name} {value:.0f}"
                                                          for name, value in breakdown["memory_mb"].items()))
    print(f"* s/run = image decoding + {EPOCHS_PER_RUN:g} epochs (the recorded runs' mean) x s/epoch "
          f"+ evaluation + image copying; validation passes are not counted. Load average at the end: "
          f"{load_average():.2f}")


if __name__ == "__main__":
    main()
