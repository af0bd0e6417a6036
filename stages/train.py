"""train: fine-tune the classifier of one run and keep the weights with the best validation loss.

With train.finetune 'all' every layer trains on the decoded images. With 'layer4' or 'head' the frozen
layers' output comes from the features stage (looked up by sha256) and only the layers after them train.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable

import pandas as pd
import torch
from dvclive import Live
from tqdm import tqdm

from stages.common import (
    Params,
    PipelineError,
    RunPaths,
    TrainParams,
    atomic_dir,
    load_params,
    main_guard,
    peak_rss_mb,
    read_manifest,
    run_arg,
    run_seed,
    weights_label,
    write_csv_atomic,
    write_json_atomic,
)
from stages.augment import Augment, augmentation, balanced_order, class_weights
from stages.network import (
    FeatureCache,
    build_model,
    fetch_pretrained_state,
    frozen_and_trainable,
    input_preparation,
    load_feature_cache,
    load_images,
    normalize,
    resolve_device,
    seed_everything,
)

log = logging.getLogger("anomaly_pipeline.train")


def batches(count: int, batch_size: int, generator: torch.Generator | None,
            order: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Index batches over ``count`` items: in the given ``order``, else shuffled when a generator is given.

    A trailing batch of one image joins the previous one: batch norm cannot train on a single image.
    """
    if order is None:
        order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


Prepare = Callable[[torch.Tensor, torch.device], torch.Tensor]


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision (float16) when ``enabled`` (fit enables it on CUDA only); float32 otherwise."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=enabled)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    prepare: Prepare = normalize,
    scaler: torch.amp.GradScaler | None = None,
    class_balance: str = "none",
    augment: Augment | None = None,
) -> tuple[float, float]:
    """One pass over the training inputs in shuffled batches; returns (mean loss, accuracy).

    ``prepare`` turns a batch of stored inputs into the model's input on ``device``; with a (CUDA) ``scaler``
    the forward pass runs in mixed precision. ``class_balance`` (train.class_balance) weights the loss by class
    or draws the epoch's images class-balanced; ``augment`` changes each image of a batch before ``prepare``.
    """
    model.train()
    total_loss, correct = 0.0, 0
    order = balanced_order(labels, generator) if class_balance == "sampler" else None
    loss_weights = class_weights(labels).to(device) if class_balance == "weighted_loss" else None
    for index in tqdm(batches(len(images), batch_size, generator, order), desc="train", unit="batch", leave=False,
                      disable=None):
        stored = images[index] if augment is None else augment(images[index])
        inputs, targets = prepare(stored, device), labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, scaler is not None):
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, weight=loss_weights)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        total_loss += loss.item() * len(index)
        correct += (logits.argmax(1) == targets).sum().item()
    return total_loss / len(images), correct / len(images)


@torch.inference_mode()
def validate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
    prepare: Prepare = normalize, amp: bool = False, balanced: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy on held-out inputs, in eval mode.

    ``balanced`` weights each image's loss by the inverse frequency of its class, so that both classes count
    the same in the loss that picks the best epoch.
    """
    model.eval()
    weights = class_weights(labels).to(device) if balanced else None
    total_loss, correct = 0.0, 0
    for index in batches(len(images), batch_size, None):
        with autocast(device, amp):
            logits = model(prepare(images[index], device)).float()
        targets = labels[index].to(device)
        if weights is None:
            total_loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        else:
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            total_loss += (losses * weights[targets]).sum().item()
        correct += (logits.argmax(1) == targets).sum().item()
    # Balanced: the weights of all images sum to len(images), so this is a weighted mean as well.
    return total_loss / len(images), correct / len(images)


def fit(
    model: torch.nn.Module,
    train_data: tuple[torch.Tensor, torch.Tensor],
    val_data: tuple[torch.Tensor, torch.Tensor],
    settings: TrainParams,
    device: torch.device,
    generator: torch.Generator,
    run: int,
    on_epoch: Callable[[dict], None] = lambda record: None,
    prepare: Prepare = normalize,
) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """Train with Adam and ReduceLROnPlateau, early stopping on validation loss.

    Runs at least ``min_epochs`` and at most ``max_epochs`` epochs, stops once the validation loss has
    not improved for ``patience`` epochs, and returns a copy of the best epoch's weights with the history.
    ``on_epoch`` receives each epoch's record (epoch, losses, accuracies, lr, seconds) as it ends.
    Mixed precision (``settings.amp``) applies on CUDA only. ``settings.class_balance`` and ``settings.augment``
    apply to training; a class balance also weights the validation loss by class.
    """
    amp = settings.amp and device.type == "cuda"
    augment = augmentation(settings.augment)
    scaler = torch.amp.GradScaler(device.type) if amp else None
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.scheduler.factor, patience=settings.scheduler.patience
    )
    best_loss, best_state, epochs_since_best, history = math.inf, None, 0, []
    for epoch in range(1, settings.max_epochs + 1):
        started = time.perf_counter()
        learning_rate = optimizer.param_groups[0]["lr"]
        train_loss, train_accuracy = train_one_epoch(model, optimizer, *train_data, settings.batch_size, device,
                                                     generator, prepare, scaler, settings.class_balance, augment)
        val_loss, val_accuracy = validate(model, *val_data, settings.batch_size, device, prepare, amp,
                                          balanced=settings.class_balance != "none")
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise PipelineError(
                f"run {run}, epoch {epoch}: loss is not finite (train {train_loss}, val {val_loss}); "
                f"lower 'train.lr' or check the input images"
            )
        improved = val_loss < best_loss
        if improved:
            best_loss, epochs_since_best = val_loss, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            epochs_since_best += 1
        scheduler.step(val_loss)
        seconds = time.perf_counter() - started
        history.append(dict(epoch=epoch, train_loss=train_loss, train_accuracy=train_accuracy, val_loss=val_loss,
                            val_accuracy=val_accuracy, lr=learning_rate, seconds=seconds, best=improved))
        on_epoch(history[-1])
        log.info("run %d epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | lr %.1e | %.1f s%s",
                 run, epoch, settings.max_epochs, train_loss, train_accuracy, val_loss, val_accuracy,
                 learning_rate, seconds, " *" if improved else "")
        if epoch >= settings.min_epochs and epochs_since_best >= settings.patience:
            log.info("run %d: early stop after epoch %d (no improvement for %d epochs)", run, epoch, epochs_since_best)
            break
    assert best_state is not None
    return best_state, pd.DataFrame(history)


def log_epoch(live: Live, record: dict) -> None:
    """One epoch into dvclive: train/val loss and accuracy, learning rate."""
    for split in ("train", "val"):
        live.log_metric(f"{split}/loss", record[f"{split}_loss"])
        live.log_metric(f"{split}/accuracy", record[f"{split}_accuracy"])
    live.log_metric("lr", record["lr"])
    live.next_step()


def load_split(params: Params, paths: RunPaths, split: str,
               cache: FeatureCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of one split of the run: its cached features when given, else its images
    (each decoded and resized once)."""
    manifest = read_manifest(paths.manifest(split))
    if cache is not None:
        inputs = cache.lookup(manifest["sha256"].tolist())
    else:
        inputs = load_images(params.data.dir, manifest["path"].tolist(), params.model.image_size,
                             params.model.resize)
    return inputs, torch.tensor(manifest["label"].to_list(), dtype=torch.long)


def initial_model(params: Params, run: int, cache: FeatureCache | None) -> torch.nn.Module:
    """The network training starts from: the frozen features' weights, ImageNet's, or random (run seed)."""
    if cache is not None:
        return build_model(params.model.arch, cache.backbone_state)
    if not params.model.pretrained:
        log.warning("run %d: model.pretrained is false: training %s from random initialisation", run, params.model.arch)
        return build_model(params.model.arch, None)
    return build_model(params.model.arch, fetch_pretrained_state(params.model.arch))


def main() -> None:
    params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    paths = RunPaths(run)
    device = resolve_device(params.device)
    finetune = params.train.finetune
    if params.train.amp and device.type != "cuda":
        log.info("run %d: train.amp applies on CUDA only; training in float32 on the %s", run, device.type)
    cache = load_feature_cache(params.model, finetune) if finetune != "all" else None
    seed = run_seed(params.seed, run)
    seed_everything(seed)
    started = time.perf_counter()
    model = initial_model(params, run, cache).to(device, memory_format=torch.channels_last)
    train_data, val_data = load_split(params, paths, "train", cache), load_split(params, paths, "val", cache)
    frozen, trainable = frozen_and_trainable(model, finetune)
    frozen.requires_grad_(False)
    log.info("run %d: training %s of %s (%s weights) on %s: %d train, %d val images", run,
             "all layers" if finetune == "all" else f"{finetune} (frozen features cached)", params.model.arch,
             weights_label(params.model.pretrained), device, len(train_data[0]), len(val_data[0]))
    generator = torch.Generator().manual_seed(seed)
    with Live(dir=str(paths.live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        live.log_params({"run": run, "seed": seed, "weights": weights_label(params.model.pretrained),
                         "finetune": finetune})
        best_state, history = fit(trainable, train_data, val_data, params.train, device, generator, run,
                                  on_epoch=lambda record: log_epoch(live, record), prepare=input_preparation(finetune))
    trainable.load_state_dict(best_state)
    train_seconds = time.perf_counter() - started
    best = history.loc[history["val_loss"].idxmin()]
    summary = {
        "weights": weights_label(params.model.pretrained),
        "finetune": finetune,
        "device": device.type,
        "epochs_run": len(history),
        "best_epoch": int(best["epoch"]),
        "best_val_loss": float(best["val_loss"]),
        "best_val_accuracy": float(best["val_accuracy"]),
        "train_seconds": round(train_seconds, 2),
        "train_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if device.type == "cuda":
        summary["train_peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    with atomic_dir(paths.model_dir) as out:
        torch.save({
            "arch": params.model.arch,
            "image_size": params.model.image_size,
            "resize": params.model.resize,
            "weights": weights_label(params.model.pretrained),
            "finetune": finetune,
            "backbone_sha256": cache.identity["backbone_sha256"] if cache is not None else None,
            "best_epoch": summary["best_epoch"],
            "state_dict": model.state_dict(),
        }, out / "model.pt")
        write_csv_atomic(out / "history.csv", history)
        write_json_atomic(out / "train_summary.json", summary)
    log.info("run %d: best epoch %d of %d (val loss %.4f), %.0f s, peak RSS %.0f MB", run, summary["best_epoch"],
             summary["epochs_run"], summary["best_val_loss"], train_seconds, summary["train_peak_rss_mb"])


if __name__ == "__main__":
    main_guard(main)
