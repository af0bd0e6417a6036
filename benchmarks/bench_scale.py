"""Memory and time against the number of images: prepare-split, decode, and training steps from the store
against the old in-memory path.

    python -m benchmarks.bench_scale [--sizes 700 5000 20000] [--batches 8] [--old-up-to 20000]

For each N, N synthetic JPEG files (half clean, half faulty, 160-640 px on a side, every one different) are
written to a temporary folder, then each step runs in its own process (so each peak RSS is its own, read with
os.wait4): the prepare-split and decode stages as dvc.yaml runs them, and a training process that takes run 0's
training images and trains a fixed number of batches (full fine-tuning, 224 px, batch 32; a whole epoch at
20,000 images would take half an hour here): once reading batches from the store (the pipeline today), once
after decoding every training image into memory first (the old path, up to --old-up-to images). Printed: a row
per N and step, then the ratios of peak RSS to the smallest N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` different JPEG files of varied sizes, half in clean/ and half in faulty/."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (int(side) for side in rng.integers(160, 641, 2))
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        path = folder / ("clean" if index % 2 == 0 else "faulty") / f"part-{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)


def run_measured(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """A command in its own process: wall seconds, its own peak RSS in MB (os.wait4) and its stdout."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=stderr,
                                 env={**os.environ, "PYTHONPATH": str(PROJECT)})
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if child.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{stderr.read()[-3000:]}")
        return seconds, usage.ru_maxrss / 1024, stdout.read()


def train_worker(project: Path, batches: int, in_memory: bool) -> None:
    """(In a child process, in the project folder.) Train ``batches`` batches on run 0's training images; print
    the seconds of the steps, the part of them spent getting batches, and the decoding time of the old path."""
    import torch

    from anomaly_pipeline.inputs import ModelInputs
    from anomaly_pipeline.layout import RunPaths, read_manifest
    from anomaly_pipeline.model import build_model, seed_everything
    from anomaly_pipeline.params import load_params
    from anomaly_pipeline.tensors import load_images

    os.chdir(project)
    params = load_params()
    manifest = read_manifest(RunPaths(0).split.manifest("train"))
    seed_everything(0)
    started = time.perf_counter()
    inputs = ModelInputs.for_training(params)
    images = (load_images(params.data.dir, manifest["path"].tolist(), params.model.image_size) if in_memory
              else inputs.load(manifest))
    decode_seconds = time.perf_counter() - started
    labels = torch.tensor(manifest["label"].tolist())
    model = build_model(params.model.arch, None).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cpu, data_seconds, started = torch.device("cpu"), 0.0, time.perf_counter()
    for step in range(batches):
        index = order[step * params.train.batch_size:(step + 1) * params.train.batch_size]
        fetched = time.perf_counter()
        batch = inputs.prepare(images[index], cpu)
        data_seconds += time.perf_counter() - fetched
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch), labels[index]).backward()
        optimizer.step()
    print(json.dumps({"train_images": len(labels), "decode_s": decode_seconds,
                      "steps_s": time.perf_counter() - started, "data_s": data_seconds}))


def measure(count: int, batches: int, old: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data, project = Path(folder) / "images", Path(folder) / "project"
        write_images(data, count)
        project.mkdir()
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())
        params |= {"runs": [0]}
        params["data"]["dir"] = str(data)
        params["model"]["arch"], params["model"]["pretrained"] = "resnet18", False  # as recorded (the study's network)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for step, module, arguments in (("prepare-split", "stages.prepare_split", ["--run", "0"]),
                                        ("decode", "stages.decode", [])):
            seconds, peak, _ = run_measured([sys.executable, "-m", module, *arguments], project)
            rows.append({"images": count, "step": step, "seconds": seconds, "peak_rss_mb": peak})
        for step, in_memory in (("train, store", False), ("train, in memory (old)", True)):
            if in_memory and not old:
                continue
            worker = [sys.executable, "-m", "benchmarks.bench_scale", "--worker", str(project), "--batches",
                      str(batches)] + (["--in-memory"] if in_memory else [])
            seconds, peak, output = run_measured(worker, PROJECT)
            result = json.loads(output.strip().splitlines()[-1])
            rows.append({"images": count, "step": step, "seconds": seconds, "peak_rss_mb": peak,
                         "decode_s": result["decode_s"], "steps_s": result["steps_s"],
                         "data_share": result["data_s"] / result["steps_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[700, 5000, 20000])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--old-up-to", type=int, default=20000, help="largest N to run the old in-memory path at")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_worker(args.worker, args.batches, args.in_memory)
        return
    rows = []
    for count in args.sizes:
        rows += measure(count, args.batches, count <= args.old_up_to)
        print(f"{count} images measured", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    smallest = table[table["images"] == min(args.sizes)].set_index("step")["peak_rss_mb"]
    table["rss_vs_smallest"] = table["peak_rss_mb"] / table["step"].map(smallest)
    print(f"{args.batches} training batches of 32 at 224 px, full fine-tuning, random init; "
          f"{os.cpu_count()} CPU cores")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.2f}", na_rep=""))


if __name__ == "__main__":
    main()
