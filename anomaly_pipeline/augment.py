"""Training-only augmentation (train.augment) and class balance (train.class_balance) on the torch side."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import WeightedRandomSampler
from torchvision.transforms import v2

from anomaly_pipeline.images import PAD_COLOUR

Augment = Callable[[torch.Tensor], torch.Tensor]


class RandomQuarterTurn(torch.nn.Module):
    """Rotate an image tensor (..., H, W) by 0, 90, 180 or 270 degrees, each equally likely (exact: no resampling)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))


def augmentation(names: Sequence[str]) -> Augment | None:
    """The random changes named in train.augment, applied to each uint8 CHW image of a batch on its own
    (torch's global generator, seeded per run: reruns are identical); None when nothing is named."""
    steps: list[torch.nn.Module] = []
    if "flip" in names:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if "rotate90" in names:
        steps.append(RandomQuarterTurn())
    if "affine" in names:
        steps.append(v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1),
                                     interpolation=v2.InterpolationMode.BILINEAR, fill=list(PAD_COLOUR)))
    if "color" in names:
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2))
    if not steps:
        return None
    transform = v2.Compose(steps)
    return lambda batch: torch.stack([transform(image) for image in batch])


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-class weights inversely proportional to the class counts (n / (2 n_c)): both classes weigh the same."""
    counts = torch.bincount(labels, minlength=2).clamp(min=1).double()
    return (len(labels) / (2 * counts)).float()


def balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch's training order drawn with replacement so that each class is equally likely per draw."""
    sample_weights = class_weights(labels)[labels].double()
    return torch.tensor(list(WeightedRandomSampler(sample_weights, len(labels), replacement=True, generator=generator)))
