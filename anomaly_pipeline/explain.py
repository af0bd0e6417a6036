"""Grad-CAM heatmaps: where in an image the network's last feature maps looked when it decided."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from anomaly_pipeline.images import open_rgb
from anomaly_pipeline.model import last_feature_maps
from anomaly_pipeline.tensors import normalize


def grad_cam(model: torch.nn.Module, image: torch.Tensor, target_class: int, device: torch.device) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of ``target_class`` at the model's last feature maps (a ResNet's layer4,
    Lite0's head convolution: ``last_feature_maps``).

    ``image`` is one uint8 CHW tensor as the model sees it; returns an (h, w) map in [0, 1] at those maps' resolution.
    """
    captured: dict[str, torch.Tensor] = {}
    handle = last_feature_maps(model).register_forward_hook(
        lambda module, inputs, output: captured.setdefault("maps", output))
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(normalize(image.unsqueeze(0), device))
            (gradient,) = torch.autograd.grad(logits[0, target_class], captured["maps"])
    finally:
        handle.remove()
    activation, gradient = captured["maps"][0].detach(), gradient[0]
    weights = gradient.mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * activation).sum(0))
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).float().cpu().numpy()


def overlay(source: Path, cam: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The Grad-CAM map, coloured (jet) and blended over the original image at the image's own size."""
    image = open_rgb(source)
    heat = Image.fromarray((cam * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    coloured = (colormaps["jet"](np.asarray(heat) / 255.0)[:, :, :3] * 255).astype(np.uint8)
    return Image.blend(image, Image.fromarray(coloured), opacity)
