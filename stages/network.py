"""The torch side shared by the stages: decoded image tensors, the network, frozen features, inference."""

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
from PIL import Image, ImageOps
from tqdm import tqdm

from stages.common import ModelParams, PipelineError, open_rgb, weights_label

FEATURES_FILE = Path("data/features/features.pt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_COLOUR = tuple(round(255 * mean) for mean in IMAGENET_MEAN)
# Seed of the frozen layers' random initialisation when model.pretrained is false (the same in every run).
FROZEN_INIT_SEED = 0

log = logging.getLogger("anomaly_pipeline")


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


# --------------------------------------------------------------------------- images


def load_image(path: Path, size: int, resize: str = "squash") -> torch.Tensor:
    """Decode an image, convert to RGB and bring it to size x size; uint8 CHW tensor.

    ``resize`` 'squash' stretches it (the study's method); 'pad' keeps its aspect ratio and fills the short side
    with the ImageNet mean colour (which normalises to zero).
    """
    image = open_rgb(path)
    if resize == "pad":
        rgb = ImageOps.pad(image, (size, size), Image.Resampling.BILINEAR, color=PAD_COLOUR)
    else:
        rgb = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def load_images(data_dir: Path, relative_paths: list[str], size: int, resize: str = "squash") -> torch.Tensor:
    """Decode and resize every listed image once into an uint8 tensor of shape (N, 3, size, size)."""
    batch = torch.empty((len(relative_paths), 3, size, size), dtype=torch.uint8)
    for index, relative in enumerate(tqdm(relative_paths, desc="decode", unit="img", leave=False, disable=None)):
        batch[index] = load_image(data_dir / relative, size, resize)
    return batch


def normalize(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NCHW images -> float, ImageNet-normalised, channels_last, on ``device``."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    floats = images.to(device, non_blocking=True).float()
    return ((floats - mean) / std).contiguous(memory_format=torch.channels_last)


def features_to_device(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Cached frozen-part features -> ``device`` (channels_last when they are feature maps)."""
    features = features.to(device, non_blocking=True)
    return features.contiguous(memory_format=torch.channels_last) if features.dim() == 4 else features


def input_preparation(finetune: str) -> Callable[[torch.Tensor, torch.device], torch.Tensor]:
    """How a batch becomes the trained part's input: images are normalised, cached features moved as they are."""
    return normalize if finetune == "all" else features_to_device


# --------------------------------------------------------------------------- model and device


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
class FeatureCache:
    """What the features stage computed: the frozen part's output for every distinct image, and its weights.

    ``identity`` names what made the features (architecture, image size, weights and their sha256, finetune).
    """

    identity: dict[str, Any]
    index: dict[str, int]
    features: torch.Tensor
    backbone_state: dict[str, torch.Tensor]

    def lookup(self, sha256s: list[str]) -> torch.Tensor:
        """The features of the images with these content hashes, in this order."""
        missing = [digest for digest in sha256s if digest not in self.index]
        if missing:
            raise PipelineError(f"{FEATURES_FILE} has no features for {len(missing)} image(s) of this run "
                                f"(first sha256 {missing[0][:12]}): it is older than the split; run 'dvc repro'")
        return self.features[[self.index[digest] for digest in sha256s]]


def feature_identity(model: ModelParams, finetune: str, backbone_sha256: str) -> dict[str, Any]:
    """What frozen features depend on; a cache made under another identity must not be used."""
    return {"arch": model.arch, "image_size": model.image_size, "resize": model.resize,
            "weights": weights_label(model.pretrained),
            "backbone_sha256": backbone_sha256, "finetune": finetune}


def load_feature_cache(model: ModelParams, finetune: str, path: Path = FEATURES_FILE) -> FeatureCache:
    """Load the features stage's output, checked against the model parameters and ``finetune`` asked for."""
    if not path.is_file():
        raise PipelineError(f"frozen features {path} are missing: run 'dvc repro' so the features stage writes them")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    expected = feature_identity(model, finetune, stored["identity"]["backbone_sha256"])
    if stored["identity"] != expected:
        raise PipelineError(f"{path} was made for {stored['identity']}, but params.yaml asks for {expected}: "
                            f"run 'dvc repro' so the features stage recomputes them")
    return FeatureCache(stored["identity"], {digest: row for row, digest in enumerate(stored["sha256"])},
                        stored["features"], stored["backbone_state"])


@dataclass
class TrainedModel:
    """A run's trained classifier, in eval mode, with the image size it was trained at, the part of it that
    was trained (train.finetune) and the sha256 of the weights it started from when a part was frozen."""

    network: torch.nn.Module
    image_size: int
    finetune: str
    backbone_sha256: str | None
    resize: str = "squash"


def load_trained_model(path: Path, device: torch.device) -> TrainedModel:
    """Load a model.pt written by the train stage onto ``device`` (channels_last, eval mode)."""
    if not path.is_file():
        raise PipelineError(f"model {path} is missing: run 'dvc repro' so the train stage writes it")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    network = build_model(checkpoint["arch"], None)
    network.load_state_dict(checkpoint["state_dict"])
    network.to(device, memory_format=torch.channels_last).eval()
    return TrainedModel(network, checkpoint["image_size"], checkpoint.get("finetune", "all"),
                        checkpoint.get("backbone_sha256"), checkpoint.get("resize", "squash"))


# --------------------------------------------------------------------------- inference


@torch.inference_mode()
def predict_scores(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                   prepare: Callable[[torch.Tensor, torch.device], torch.Tensor] = normalize) -> np.ndarray:
    """Probability of the positive (faulty) class for every image (or cached feature, with ``prepare``), in batches."""
    model.eval()
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", leave=False, disable=None):
        logits = model(prepare(images[start:start + batch_size], device))
        scores.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(scores).numpy() if scores else np.empty(0, dtype=np.float32)


