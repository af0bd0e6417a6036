"""Frozen features (train.finetune last_block or head): the frozen layers' output computed once per distinct image,
and looked up by the image's sha256 by every run's train and evaluate."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.layout import FeatureFiles
from anomaly_pipeline.model import (build_model, fetch_pretrained_state, frozen_and_trainable, imagenet_network,
                                    state_sha256)
from anomaly_pipeline.params import ModelParams, Params
from anomaly_pipeline.store import ImageStore, StoredImages
from anomaly_pipeline.tensors import normalize

# Seed of the frozen layers' random initialisation when model.pretrained is false (the same in every run).
FROZEN_INIT_SEED = 0
# Images per forward pass of the frozen layers (a fixed number: the features must not depend on a setting).
BATCH_SIZE = 64

log = logging.getLogger("anomaly_pipeline.features")


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
            raise PipelineError(f"{FeatureFiles().features} has no features for {len(missing)} image(s) of this run "
                                f"(first sha256 {missing[0][:12]}): it is older than the split; run 'dvc repro'")
        return self.features[[self.index[digest] for digest in sha256s]]


def feature_identity(model: ModelParams, finetune: str, backbone_sha256: str) -> dict[str, Any]:
    """What frozen features depend on; a cache made under another identity must not be used."""
    return {"arch": model.arch, "image_size": model.image_size, "resize": model.resize,
            "weights": model.weights,
            "backbone_sha256": backbone_sha256, "finetune": finetune}


def load_feature_cache(model: ModelParams, finetune: str, path: Path = FeatureFiles().features) -> FeatureCache:
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


def backbone_state(params: Params) -> dict[str, torch.Tensor]:
    """The starting weights of the whole network: ImageNet's, or a random initialisation fixed for all runs."""
    if params.model.pretrained:
        return fetch_pretrained_state(params.model.arch)
    log.warning("model.pretrained is false: the frozen layers keep a random initialisation (seed %d); "
                "their features only make sense with ImageNet weights", FROZEN_INIT_SEED)
    torch.manual_seed(FROZEN_INIT_SEED)
    return imagenet_network(params.model.arch).state_dict()


@torch.inference_mode()
def extract(frozen: torch.nn.Module, images: StoredImages, device: torch.device) -> torch.Tensor:
    """The frozen part's output for each image of the store, in batches."""
    outputs = []
    for start in tqdm(range(0, len(images), BATCH_SIZE), desc="features", unit="batch", leave=False, disable=None):
        outputs.append(frozen(normalize(images[start:start + BATCH_SIZE], device)).float().cpu().contiguous())
    return torch.cat(outputs)


def compute_features(params: Params, device: torch.device) -> tuple[dict[str, Any], list[str], torch.Tensor,
                                                                      dict[str, torch.Tensor]]:
    """The frozen part's output for every image of the decoded-image store: (identity, sha256s, features, weights)."""
    digests, images = ImageStore(params.model.image_size, params.model.resize).all()
    state = backbone_state(params)
    identity = feature_identity(params.model, params.train.finetune, state_sha256(state))
    network = build_model(params.model.arch, state).to(device, memory_format=torch.channels_last).eval()
    frozen, _ = frozen_and_trainable(network, params.train.finetune)
    return identity, digests, extract(frozen, images, device), state


def save_features(path: Path, identity: dict[str, Any], digests: list[str], features: torch.Tensor,
                  state: dict[str, torch.Tensor]) -> None:
    torch.save({"identity": identity, "sha256": digests, "features": features, "backbone_state": state}, path)
