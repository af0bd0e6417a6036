"""A run's manifest -> the inputs of the part of the network that trains: ``train.finetune`` is decided here, once.

With 'all' every layer trains on the decode stage's images (read and normalised batch by batch); with 'last_block' or
'head' the frozen layers' output comes from the features stage. Both are looked up by each image's sha256.
Train, evaluate and the benchmarks all go through ``ModelInputs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import pandas as pd
import torch

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.features import FeatureCache, load_feature_cache
from anomaly_pipeline.layout import FeatureFiles
from anomaly_pipeline.model import TrainedModel, build_model, fetch_pretrained_state, frozen_and_trainable
from anomaly_pipeline.params import Params
from anomaly_pipeline.store import ImageStore, StoredImages
from anomaly_pipeline.tensors import features_to_device, normalize

log = logging.getLogger("anomaly_pipeline")


@dataclass
class ModelInputs:
    """Where a run's inputs come from and how a batch of them becomes the trained part's input."""

    image_size: int
    resize: str
    finetune: str
    cache: FeatureCache | None

    @classmethod
    def for_training(cls, params: Params) -> ModelInputs:
        """The inputs params.yaml asks for (the cached features when a part is frozen)."""
        finetune = params.train.finetune
        cache = load_feature_cache(params.model, finetune) if finetune != "all" else None
        return cls(params.model.image_size, params.model.resize, finetune, cache)

    @classmethod
    def for_model(cls, params: Params, trained: TrainedModel) -> ModelInputs:
        """The inputs a trained model was trained on; its cached features must come from the same weights."""
        cache = None
        if trained.finetune != "all":
            cache = load_feature_cache(params.model, trained.finetune)
            if cache.identity["backbone_sha256"] != trained.backbone_sha256:
                raise PipelineError(f"{FeatureFiles().features} holds features of other weights than the model was "
                                    f"trained from: run 'dvc repro' so train and evaluate run again")
        return cls(trained.image_size, trained.resize, trained.finetune, cache)

    @property
    def frozen_features(self) -> bool:
        return self.cache is not None

    @cached_property
    def store(self) -> ImageStore:
        """The decoded-image store, opened (and checked) once however many manifests are loaded."""
        return ImageStore(self.image_size, self.resize)

    def load(self, manifest: pd.DataFrame) -> torch.Tensor | StoredImages:
        """The stored inputs of a manifest's images, in its order: cached features (in memory, small), or the
        decoded images (indexable like a tensor, read from the store a batch at a time)."""
        if self.cache is not None:
            return self.cache.lookup(manifest["sha256"].tolist())
        return self.store.images(manifest["sha256"].tolist())

    def prepare(self, stored: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of stored inputs -> the trained part's input on ``device``."""
        return features_to_device(stored, device) if self.frozen_features else normalize(stored, device)

    def trained_part(self, network: torch.nn.Module) -> tuple[torch.nn.Sequential, torch.nn.Module]:
        """(frozen part, trained part) of the network; the frozen part is empty with 'all'."""
        return frozen_and_trainable(network, self.finetune)

    def initial_network(self, arch: str, pretrained: bool) -> torch.nn.Module:
        """The network training starts from: the frozen features' weights, ImageNet's, or random (run seed)."""
        if self.cache is not None:
            return build_model(arch, self.cache.backbone_state)
        if not pretrained:
            log.warning("model.pretrained is false: training %s from random initialisation", arch)
            return build_model(arch, None)
        return build_model(arch, fetch_pretrained_state(arch))
