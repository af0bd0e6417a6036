"""Images as tensors: decoded (by images.square_image) into uint8 batches, and normalised into the model's input."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from anomaly_pipeline.images import IMAGENET_MEAN, IMAGENET_STD, square_image


def load_image(path: Path, size: int, resize: str = "squash") -> torch.Tensor:
    """An image decoded and brought to size x size (``images.square_image``): uint8 CHW tensor."""
    return torch.from_numpy(square_image(path, size, resize).copy()).permute(2, 0, 1).contiguous()


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
