"""features: run the frozen part of the network once over every distinct image (train.finetune layer4 or head).

Every run's train and evaluate stages then look the features up by the image's sha256 instead of decoding
the image and running the frozen layers again. With train.finetune 'all' nothing is frozen and the stage
writes only the identity file that says so.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from stages.common import (
    Params,
    PipelineError,
    atomic_dir,
    class_dirs,
    list_folder,
    load_params,
    main_guard,
    sha256_file,
    write_json_atomic,
)
from stages.network import (
    FEATURES_FILE,
    FROZEN_INIT_SEED,
    build_model,
    feature_identity,
    fetch_pretrained_state,
    frozen_and_trainable,
    load_image,
    normalize,
    resolve_device,
    state_sha256,
)

log = logging.getLogger("anomaly_pipeline.features")


def distinct_images(params: Params) -> dict[str, str]:
    """sha256 -> path (relative to data.dir) of every distinct image file in the two class folders."""
    images: dict[str, str] = {}
    for folder in class_dirs(params.data.dir, params.data.negative_class, params.data.positive_class):
        for path in list_folder(folder).images:
            images.setdefault(sha256_file(path), path.relative_to(params.data.dir).as_posix())
    return images


def backbone_state(params: Params) -> dict[str, torch.Tensor]:
    """The starting weights of the whole network: ImageNet's, or a random initialisation fixed for all runs."""
    if params.model.pretrained:
        return fetch_pretrained_state(params.model.arch)
    log.warning("model.pretrained is false: the frozen layers keep a random initialisation (seed %d); "
                "their features only make sense with ImageNet weights", FROZEN_INIT_SEED)
    import torchvision.models as models

    torch.manual_seed(FROZEN_INIT_SEED)
    return models.get_model(params.model.arch, weights=None).state_dict()


@torch.inference_mode()
def extract(frozen: torch.nn.Module, params: Params, images: dict[str, str],
            device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The frozen part's output for each image, in batches; unreadable images are left out (prepare-split
    reports them, or stops with data.strict)."""
    digests, outputs, skipped = [], [], []
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        batch = torch.stack([image for _, image in pending])
        outputs.append(frozen(normalize(batch, device)).float().cpu().contiguous())
        digests.extend(digest for digest, _ in pending)
        pending.clear()

    for digest, relative in tqdm(images.items(), desc="features", unit="img", leave=False, disable=None):
        try:
            pending.append((digest, load_image(params.data.dir / relative, params.model.image_size,
                                                      params.model.resize)))
        except PipelineError:
            if params.data.strict:
                raise
            skipped.append(relative)
            continue
        if len(pending) == params.evaluate.batch_size:
            flush()
    if pending:
        flush()
    if skipped:
        log.warning("%d unreadable image(s) left out (prepare-split lists them), e.g. %s", len(skipped), skipped[0])
    if not outputs:
        raise PipelineError(f"no readable image in {params.data.dir}: nothing to compute features of")
    return digests, torch.cat(outputs)


def main() -> None:
    params = load_params()
    finetune = params.train.finetune
    with atomic_dir(FEATURES_FILE.parent) as out:
        if finetune == "all":
            write_json_atomic(out / "summary.json", {"finetune": "all", "features": "none: nothing is frozen"})
            log.info("train.finetune is 'all': no frozen features to compute")
            return
        started = time.perf_counter()
        device = resolve_device(params.device)
        images = distinct_images(params)
        state = backbone_state(params)
        identity = feature_identity(params.model, finetune, state_sha256(state))
        network = build_model(params.model.arch, state).to(device, memory_format=torch.channels_last).eval()
        frozen, _ = frozen_and_trainable(network, finetune)
        digests, features = extract(frozen, params, images, device)
        torch.save({"identity": identity, "sha256": digests, "features": features, "backbone_state": state},
                   out / FEATURES_FILE.name)
        seconds = time.perf_counter() - started
        write_json_atomic(out / "summary.json", {**identity, "images": len(digests),
                                                  "feature_shape": list(features.shape[1:]),
                                                  "seconds": round(seconds, 2)})
    log.info("features for %d distinct images (%s each, %s weights, finetune %s) in %.0f s", len(digests),
             "x".join(map(str, features.shape[1:])), identity["weights"], finetune, seconds)


if __name__ == "__main__":
    main_guard(main)
