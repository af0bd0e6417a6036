"""train: fine-tune the classifier of one run and keep the weights with the best validation loss."""

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
    build_model,
    fetch_pretrained_state,
    load_images,
    load_params,
    main_guard,
    normalize,
    peak_rss_mb,
    read_manifest,
    resolve_device,
    run_arg,
    run_seed,
    seed_everything,
    weights_label,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger("anomaly_pipeline.train")


def batches(count: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches over ``count`` items, shuffled when a generator is given.

    A trailing batch of one image joins the previous one: batch norm cannot train on a single image.
    """
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One pass over the training images in shuffled batches; returns (mean loss, accuracy)."""
    model.train()
    total_loss, correct = 0.0, 0
    for index in tqdm(batches(len(images), batch_size, generator), desc="train", unit="batch", leave=False, disable=None):
        inputs, targets = normalize(images[index], device), labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(index)
        correct += (logits.argmax(1) == targets).sum().item()
    return total_loss / len(images), correct / len(images)


@torch.inference_mode()
def validate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy on held-out images, in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for index in batches(len(images), batch_size, None):
        logits = model(normalize(images[index], device))
        targets = labels[index].to(device)
        total_loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
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
) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """Train with Adam and ReduceLROnPlateau, early stopping on validation loss.

    Runs at least ``min_epochs`` and at most ``max_epochs`` epochs, stops once the validation loss has
    not improved for ``patience`` epochs, and returns a copy of the best epoch's weights with the history.
    ``on_epoch`` receives each epoch's record (epoch, losses, accuracies, lr, seconds) as it ends.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.scheduler.factor, patience=settings.scheduler.patience
    )
    best_loss, best_state, epochs_since_best, history = math.inf, None, 0, []
    for epoch in range(1, settings.max_epochs + 1):
        started = time.perf_counter()
        learning_rate = optimizer.param_groups[0]["lr"]
        train_loss, train_accuracy = train_one_epoch(model, optimizer, *train_data, settings.batch_size, device, generator)
        val_loss, val_accuracy = validate(model, *val_data, settings.batch_size, device)
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


def load_split(params: Params, paths: RunPaths, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded images and labels of one split of the run (each image decoded and resized once)."""
    manifest = read_manifest(paths.manifest(split))
    images = load_images(params.data.dir, manifest["path"].tolist(), params.model.image_size)
    return images, torch.tensor(manifest["label"].to_list(), dtype=torch.long)


def main() -> None:
    params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    paths = RunPaths(run)
    device = resolve_device(params.device)
    pretrained_state = fetch_pretrained_state(params.model.arch) if params.model.pretrained else None
    if pretrained_state is None:
        log.warning("run %d: model.pretrained is false: training %s from random initialisation",
                    run, params.model.arch)
    seed = run_seed(params.seed, run)
    seed_everything(seed)
    started = time.perf_counter()
    train_data, val_data = load_split(params, paths, "train"), load_split(params, paths, "val")
    model = build_model(params.model.arch, pretrained_state).to(device, memory_format=torch.channels_last)
    log.info("run %d: training %s (%s weights) on %s: %d train, %d val images", run, params.model.arch,
             weights_label(params.model.pretrained), device, len(train_data[0]), len(val_data[0]))
    generator = torch.Generator().manual_seed(seed)
    with Live(dir=str(paths.live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        live.log_params({"run": run, "seed": seed, "weights": weights_label(params.model.pretrained)})
        best_state, history = fit(model, train_data, val_data, params.train, device, generator, run,
                                  on_epoch=lambda record: log_epoch(live, record))
    train_seconds = time.perf_counter() - started
    best = history.loc[history["val_loss"].idxmin()]
    summary = {
        "weights": weights_label(params.model.pretrained),
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
            "weights": weights_label(params.model.pretrained),
            "best_epoch": summary["best_epoch"],
            "state_dict": best_state,
        }, out / "model.pt")
        write_csv_atomic(out / "history.csv", history)
        write_json_atomic(out / "train_summary.json", summary)
    log.info("run %d: best epoch %d of %d (val loss %.4f), %.0f s, peak RSS %.0f MB", run, summary["best_epoch"],
             summary["epochs_run"], summary["best_val_loss"], train_seconds, summary["train_peak_rss_mb"])


if __name__ == "__main__":
    main_guard(main)
