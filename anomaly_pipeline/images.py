"""The one image decoder (training, evaluation, features, predict, report thumbnails) and the class-folder listing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.params import OWN_DATA_COMMAND

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# model.resize pad fills with the ImageNet mean colour, which normalises to zero.
PAD_COLOUR = tuple(round(255 * mean) for mean in IMAGENET_MEAN)


@dataclass(frozen=True)
class FolderListing:
    """What a class folder holds: image files, and other files that are not images."""

    images: list[Path]
    others: list[Path]


def list_folder(root: Path) -> FolderListing:
    """Files under ``root`` (recursively, sorted): images by extension, and everything else.

    Hidden files and folders (``.DS_Store``, ``.git``) and system files (``Thumbs.db``) are left out of both.
    """
    images, others = [], []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.name.lower() in SYSTEM_FILES:
            continue
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return FolderListing(images, others)


def class_dirs(data_dir: Path, negative_class: str, positive_class: str) -> tuple[Path, Path]:
    """The negative and the positive class folder under ``data_dir``; PipelineError naming the fix if one is missing."""
    if not data_dir.is_dir():
        raise PipelineError(
            f"data folder {data_dir} (params.yaml 'data.dir') does not exist. Point it at a folder with one "
            f"subfolder per class, for example: {OWN_DATA_COMMAND}"
        )
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_name in (negative_class, positive_class):
        if class_name not in folders:
            raise PipelineError(
                f"class folder {data_dir / class_name} does not exist (folders present: {folders}); set "
                f"'data.negative_class' / 'data.positive_class' in params.yaml to your two class folder names"
            )
    return data_dir / negative_class, data_dir / positive_class


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit greyscale scaled down, transparency composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, converted to 8-bit RGB.

    Raises PipelineError naming the file when it is empty, truncated, not an image or too large.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise PipelineError(f"{path}: too large to decode safely ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = "empty file" if path.stat().st_size == 0 else f"{type(error).__name__}: {error}"
        raise PipelineError(f"{path}: cannot be decoded as an image ({reason})") from error


def square_image(path: Path, size: int, resize: str = "squash") -> np.ndarray:
    """An image decoded by ``open_rgb`` and brought to size x size: uint8 HWC array.

    ``resize`` 'squash' stretches it (the study's method); 'pad' keeps its aspect ratio and fills the short side
    with the ImageNet mean colour.
    """
    image = open_rgb(path)
    if resize == "pad":
        square = ImageOps.pad(image, (size, size), Image.Resampling.BILINEAR, color=PAD_COLOUR)
    else:
        square = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(square)
