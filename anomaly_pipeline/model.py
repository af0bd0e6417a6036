"""The network: seeding, device, ImageNet or random weights (one origin label), building, splitting into frozen and
trained parts, saving and loading a run's model, scoring in batches."""

from __future__ import annotations

import hashlib
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from anomaly_pipeline.errors import PipelineError

log = logging.getLogger("anomaly_pipeline")

Prepare = Callable[[torch.Tensor, torch.device], torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, a debugging aid that costs 5 % of training here;
    # no kernel reads memory it has not written, so results stay bit-identical without it (tested).
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params.yaml: 'device' is 'cuda' but no CUDA device is present; use 'auto' or 'cpu'")
    return torch.device(name)


def _weights_enum(arch: str) -> Any:
    import torchvision.models as models

    return models.get_model_weights(arch).IMAGENET1K_V1


def fetch_pretrained_state(arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of ``arch`` via torchvision's weights API (TORCH_HOME cache or download).

    Raises PipelineError naming the remedies when the weights can be neither found nor downloaded.
    """
    weights = _weights_enum(arch)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except (OSError, RuntimeError) as error:
        raise PipelineError(
            f"cannot obtain ImageNet weights for {arch}: {error}. Expected them in the torch cache at "
            f"{cache} (set TORCH_HOME to a folder holding hub/checkpoints/{cache.name}), or a network "
            f"connection to download them. To train from random initialisation instead, set "
            f"'model.pretrained: false' (e.g. dvc exp run -S model.pretrained=false)."
        ) from error
    log.info("ImageNet weights for %s loaded from %s", arch, cache)
    return state


def build_model(arch: str, pretrained_state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The classifier: a torchvision ResNet, ImageNet weights if given, final layer replaced by 2 outputs."""
    import torchvision.models as models

    model = models.get_model(arch, weights=None)
    if pretrained_state is not None:
        model.load_state_dict(pretrained_state)
    model.fc = torch.nn.Linear(model.fc.in_features, 2)
    return model


def frozen_and_trainable(model: torch.nn.Module, finetune: str) -> tuple[torch.nn.Sequential, torch.nn.Module]:
    """Split a torchvision ResNet into the part ``finetune`` freezes and the part it trains.

    Both parts share the model's modules, so training the second trains the model; the first followed by
    the second computes what the model computes. With 'all' nothing is frozen and the second part is the model.
    """
    if finetune == "all":
        return torch.nn.Sequential(), model
    parts = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3,
             model.layer4, model.avgpool, torch.nn.Flatten(1), model.fc]
    cut = parts.index(model.layer4 if finetune == "layer4" else model.fc)
    return torch.nn.Sequential(*parts[:cut]), torch.nn.Sequential(*parts[cut:])


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's names and tensor bytes: the identity of a set of weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TrainedModel:
    """A run's trained classifier with what its inputs must look like (image size, resize) and what was trained
    (train.finetune; the sha256 of the frozen weights when a part was frozen)."""

    network: torch.nn.Module
    arch: str
    image_size: int
    resize: str
    finetune: str
    backbone_sha256: str | None

    def save(self, path: Path) -> None:
        torch.save({"arch": self.arch, "image_size": self.image_size, "resize": self.resize,
                    "finetune": self.finetune, "backbone_sha256": self.backbone_sha256,
                    "state_dict": self.network.state_dict()}, path)


def load_trained_model(path: Path, device: torch.device) -> TrainedModel:
    """Load a model.pt written by the train stage onto ``device`` (channels_last, eval mode)."""
    if not path.is_file():
        raise PipelineError(f"model {path} is missing: run 'dvc repro' so the train stage writes it")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    network = build_model(checkpoint["arch"], None)
    network.load_state_dict(checkpoint["state_dict"])
    network.to(device, memory_format=torch.channels_last).eval()
    return TrainedModel(network, checkpoint["arch"], checkpoint["image_size"], checkpoint["resize"],
                        checkpoint["finetune"], checkpoint["backbone_sha256"])


@torch.inference_mode()
def predict_scores(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device,
                   prepare: Prepare) -> np.ndarray:
    """Probability of the positive (faulty) class for every input, in batches; ``prepare`` turns a batch of stored
    inputs (images or cached features) into the model's input on ``device``."""
    model.eval()
    scores = []
    for start in tqdm(range(0, len(inputs), batch_size), desc="predict", unit="batch", leave=False, disable=None):
        logits = model(prepare(inputs[start:start + batch_size], device))
        scores.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(scores).numpy() if scores else np.empty(0, dtype=np.float32)
