"""export: write a run's model as a torch.export program (.pt2) or ONNX and check it against PyTorch.

    anomaly-export --run 0 --format pt2|onnx [--output FILE] [--verbose]     (or: python -m anomaly_pipeline.export)

The check runs the exported model and the PyTorch model on up to 8 of the run's test images and
fails when a faulty probability differs by more than TOLERANCE. ONNX needs onnxruntime for the check.
The exporters' own progress lines are shown only with --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.layout import RunPaths, read_manifest
from anomaly_pipeline.model import load_trained_model
from anomaly_pipeline.params import check_run, load_params
from anomaly_pipeline.tensors import load_images, normalize

log = logging.getLogger("anomaly_pipeline.export")
TOLERANCE = 1e-4  # largest allowed difference of a faulty probability
SAMPLES = 8
FORMATS = ("pt2", "onnx")  # also the exported file's suffix


def export_model(network: torch.nn.Module, example: torch.Tensor, fmt: str, output: Path) -> None:
    """Write ``network`` (CPU, eval mode) as a torch.export program or ONNX (batch dimension dynamic)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    batch_dynamic = {"x": {0: torch.export.Dim("batch")}}
    if fmt == "pt2":
        program = torch.export.export(network, (example,), dynamic_shapes=batch_dynamic)
        torch.export.save(program, output)
    else:
        torch.onnx.export(network, (example,), str(output), input_names=["image"], output_names=["logits"],
                          dynamic_shapes=batch_dynamic, dynamo=True,
                          external_data=False)


def exported_probabilities(path: Path, fmt: str, inputs: torch.Tensor) -> np.ndarray:
    """Faulty probabilities of the exported model on normalised inputs."""
    if fmt == "pt2":
        with torch.inference_mode():
            logits = torch.export.load(path).module()(inputs)
    else:
        try:
            import onnxruntime
        except ImportError as error:
            raise PipelineError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from error
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"image": inputs.numpy()})[0])
    return torch.softmax(logits, dim=1)[:, 1].numpy()


def main() -> None:
    params = load_params()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=int, required=True, help="run whose model to export")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="pt2: torch.export program (torch.export.load); onnx: ONNX (onnxruntime and others)")
    parser.add_argument("--output", type=Path, help="file to write (default: data/exports/run-N/model.pt2|onnx)")
    parser.add_argument("--verbose", action="store_true", help="show the exporter's own progress messages")
    args = parser.parse_args()
    paths = RunPaths(check_run(args.run, params))
    output = args.output or paths.exports_dir / f"model.{args.format}"
    cpu = torch.device("cpu")
    trained = load_trained_model(paths.model.model, cpu)
    network = trained.network.to(memory_format=torch.contiguous_format)
    test = read_manifest(paths.split.manifest("test"))
    samples = load_images(params.data.dir, test["path"].head(SAMPLES).tolist(), trained.image_size,
                          trained.resize)
    inputs = normalize(samples, cpu).contiguous()
    with contextlib.ExitStack() as quiet:
        if not args.verbose:
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            quiet.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            logging.disable(logging.INFO)  # the ONNX optimiser logs every pass at INFO
            quiet.callback(logging.disable, logging.NOTSET)
        export_model(network, inputs[:2], args.format, output)
    with torch.inference_mode():
        expected = torch.softmax(network(inputs), dim=1)[:, 1].numpy()
    difference = float(np.abs(exported_probabilities(output, args.format, inputs) - expected).max())
    if difference > TOLERANCE:
        raise PipelineError(f"{output}: exported model differs from PyTorch by {difference:.2e} "
                            f"(tolerance {TOLERANCE:.0e}) on {len(inputs)} test images")
    size = trained.image_size
    log.info("wrote %s (%s, input N x 3 x %d x %d, RGB, ImageNet-normalised, resize %s); on %d test images its "
             "faulty probabilities match PyTorch within %.1e (max diff %.1e)", output, args.format, size, size,
             trained.resize, len(inputs), TOLERANCE, difference)


def cli() -> None:
    """The console entry point anomaly-export."""
    main_guard(main)


if __name__ == "__main__":
    cli()
