"""The training loop: one epoch, validation, early stopping and the best-validation weights (``fit``)."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from anomaly_pipeline.augment import Augment, augmentation, balanced_order, class_weights
from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.model import Prepare, classifier, faulty_probability
from anomaly_pipeline.params import BestBy, TrainParams
from anomaly_pipeline.tensors import normalize

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


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision (float16) when ``enabled`` (fit enables it on CUDA only); float32 otherwise."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=enabled)


def use_amp(settings: TrainParams, device: torch.device) -> bool:
    """Mixed precision only where it is asked for and the device is CUDA: the CPU always trains in float32."""
    return settings.amp and device.type == "cuda"


class Validation(NamedTuple):
    """One pass over the validation inputs: mean cross-entropy, accuracy (argmax) and ROC-AUC of the faulty
    probability."""

    loss: float
    accuracy: float
    roc_auc: float


def selection_key(best_by: BestBy, loss: float, roc_auc: float) -> tuple[float, ...]:
    """What train.best_by compares, lower is better: the validation loss, or the validation ROC-AUC with ties
    (a saturated 1.0, say) going to the lower loss."""
    return (loss,) if best_by == "val_loss" else (-roc_auc, loss)


@dataclass
class EarlyStopping:
    """Early stopping on a validation figure (``selection_key``, lower is better): at least ``min_epochs``, at
    most ``max_epochs``, and stop once ``patience`` epochs in a row brought nothing better than the best so far."""

    min_epochs: int
    max_epochs: int
    patience: int
    best: tuple[float, ...] = (math.inf,)
    epochs_since_best: int = 0
    epoch: int = 0

    def update(self, key: tuple[float, ...]) -> bool:
        """Record one epoch's figure; True when it is the best so far."""
        self.epoch += 1
        improved = key < self.best
        if improved:
            self.best, self.epochs_since_best = key, 0
        else:
            self.epochs_since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.epoch >= self.max_epochs or (
            self.epoch >= self.min_epochs and self.epochs_since_best >= self.patience)


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
    frozen_norms: Sequence[torch.nn.Module] = (),
) -> tuple[float, float]:
    """One pass over the training inputs in shuffled batches; returns (mean loss, accuracy).

    ``prepare`` turns a batch of stored inputs into the model's input on ``device``; with a (CUDA) ``scaler``
    the forward pass runs in mixed precision. ``class_balance`` (train.class_balance) weights the loss by class
    or draws the epoch's images class-balanced; ``augment`` changes each image of a batch before ``prepare``.
    ``frozen_norms`` (batch-norm layers) normalise with their running statistics and leave them as they are.
    """
    model.train()
    for norm in frozen_norms:
        norm.eval()
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
) -> Validation:
    """Loss, accuracy and ROC-AUC on held-out inputs (both classes among them), in eval mode.

    ``balanced`` weights each image's loss by the inverse frequency of its class, so that both classes count
    the same in the loss that picks the best epoch.
    """
    model.eval()
    weights = class_weights(labels).to(device) if balanced else None
    total_loss, correct, scores = 0.0, 0, []
    for index in batches(len(images), batch_size, None):
        with autocast(device, amp):
            logits = model(prepare(images[index], device)).float()
        targets = labels[index].to(device)
        scores.append(faulty_probability(logits))
        if weights is None:
            total_loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        else:
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            total_loss += (losses * weights[targets]).sum().item()
        correct += (logits.argmax(1) == targets).sum().item()
    faulty = torch.cat(scores)
    roc_auc = float(roc_auc_score(labels.numpy(), faulty.numpy())) if faulty.isfinite().all() else math.nan
    # Balanced: the weights of all images sum to len(images), so this is a weighted mean as well.
    return Validation(total_loss / len(images), correct / len(images), roc_auc)


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
    """Train with Adam and ReduceLROnPlateau (on the validation loss), early stopping on the validation figure
    ``settings.best_by`` names (``EarlyStopping``); return a copy of the best epoch's weights with the history.

    ``on_epoch`` receives each epoch's record (epoch, losses, accuracies, lr, seconds) as it ends. Mixed
    precision (``settings.amp``) applies on CUDA only. ``settings.class_balance`` and ``settings.augment``
    apply to training; a class balance also weights the validation loss by class.
    """
    amp = use_amp(settings, device)
    augment = augmentation(settings.augment)
    scaler = torch.amp.GradScaler(device.type) if amp else None
    head, backbone = head_and_backbone(model, settings)
    optimizer = torch.optim.Adam([{"params": head, "lr": settings.lr},
                                  {"params": backbone, "lr": settings.lr * settings.backbone_lr_factor}])
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.scheduler.factor, patience=settings.scheduler.patience
    )
    stopping = EarlyStopping(settings.min_epochs, settings.max_epochs, settings.patience)
    best_state, history = None, []
    while not stopping.should_stop:
        epoch = stopping.epoch + 1
        started = time.perf_counter()
        learning_rate = optimizer.param_groups[0]["lr"]
        head_only = epoch <= settings.head_epochs
        for parameter in backbone:
            parameter.requires_grad_(not head_only)
        train_loss, train_accuracy = train_one_epoch(
            model, optimizer, *train_data, settings.batch_size, device, generator, prepare, scaler,
            settings.class_balance, augment, norms if head_only or settings.freeze_bn_stats else ())
        val_loss, val_accuracy, val_roc_auc = validate(model, *val_data, settings.batch_size, device, prepare, amp,
                                                       balanced=settings.class_balance != "none")
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise PipelineError(
                f"run {run}, epoch {epoch}: loss is not finite (train {train_loss}, val {val_loss}); "
                f"lower 'train.lr' or check the input images"
            )
        improved = stopping.update(selection_key(settings.best_by, val_loss, val_roc_auc))
        if improved:
            best_state = copy.deepcopy(model.state_dict())
        if not head_only:  # the learning rate the layers start with is not cut while the classifier alone learns
            scheduler.step(val_loss)
        seconds = time.perf_counter() - started
        history.append(dict(epoch=epoch, trained="classifier" if head_only else "all", train_loss=train_loss,
                            train_accuracy=train_accuracy, val_loss=val_loss, val_accuracy=val_accuracy,
                            val_roc_auc=val_roc_auc, lr=learning_rate, seconds=seconds, best=improved))
        on_epoch(history[-1])
        log.info("run %d epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f roc-auc %.3f | lr %.1e | "
                 "%.1f s%s", run, epoch, settings.max_epochs, train_loss, train_accuracy, val_loss, val_accuracy,
                 val_roc_auc, learning_rate, seconds, " *" if improved else "")
    if stopping.epoch < settings.max_epochs:
        log.info("run %d: early stop after epoch %d (no improvement for %d epochs)", run, stopping.epoch,
                 stopping.epochs_since_best)
    assert best_state is not None
    for parameter in backbone:
        parameter.requires_grad_(True)
    return best_state, pd.DataFrame(history)


def head_and_backbone(model: torch.nn.Module, settings: TrainParams) -> tuple[list[torch.nn.Parameter],
                                                                             list[torch.nn.Parameter]]:
    """The trained parameters as (classifier's, the rest): the rest learns at train.lr x train.backbone_lr_factor and
    waits train.head_epochs. With the study's method, or a frozen part, all of them are the first group."""
    if not settings.recipe:
        return list(model.parameters()), []
    head = list(classifier(model).parameters())
    in_head = {id(parameter) for parameter in head}
    return head, [parameter for parameter in model.parameters() if id(parameter) not in in_head]
