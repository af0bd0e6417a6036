"""The training loop: best-validation weights are the result, epoch bounds and patience hold, NaN fails loudly."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from stages.common import PipelineError, SchedulerParams, TrainParams
from stages.network import build_model, seed_everything
from stages.train import batches, fit, validate

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
    last_loss, _ = validate(model, *tiny_data(2, 12), 8, CPU)
    model.load_state_dict(best)
    best_loss, _ = validate(model, *tiny_data(2, 12), 8, CPU)
    assert best_loss == pytest.approx(history["val_loss"].min(), rel=1e-6)
    assert last_loss == pytest.approx(history["val_loss"].iloc[-1], rel=1e-6)
    assert best_loss < last_loss


def test_early_stopping_waits_for_min_epochs_and_counts_patience() -> None:
    _, _, history = train(min_epochs=3, max_epochs=8, patience=1)
    assert 3 <= len(history) <= 8
    if len(history) < 8:
        assert not history["best"].iloc[-1]  # stopped after an epoch without improvement
    _, _, history = train(min_epochs=4, max_epochs=4, patience=0)
    assert len(history) == 4  # patience 0 still trains min_epochs, never more than max_epochs


def test_non_finite_loss_fails_with_run_and_epoch() -> None:
    with pytest.raises(PipelineError, match=r"run 0, epoch 1: loss is not finite.*train\.lr"):
        train(lr=1e30, max_epochs=2)


def test_batches_never_leave_a_single_image_for_batch_norm() -> None:
    sizes = [len(batch) for batch in batches(33, 32, torch.Generator().manual_seed(0))]
    assert sizes == [33]
    assert sorted(torch.cat(batches(65, 32, None)).tolist()) == list(range(65))


def test_grad_cam_is_a_normalised_map_that_depends_on_the_image() -> None:
    from stages.explain import grad_cam

    seed_everything(0)
    model = build_model("resnet18", None)
    images, _ = tiny_data(3, 2)
    large = torch.nn.functional.interpolate(images.float(), size=128).to(torch.uint8)
    maps = [grad_cam(model, image, 1, CPU) for image in large]
    assert maps[0].shape == (4, 4)  # layer4 of a ResNet downsamples by 32
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)
    assert not (maps[0] == maps[1]).all()
    assert all(p.grad is None for p in model.parameters())


def test_amp_is_a_cuda_option_and_changes_nothing_on_the_cpu() -> None:
    _, best_fp32, history_fp32 = train(min_epochs=2, max_epochs=2)
    _, best_amp, history_amp = train(min_epochs=2, max_epochs=2, amp=True)
    pd.testing.assert_frame_equal(history_amp.drop(columns="seconds"), history_fp32.drop(columns="seconds"))
    assert all(torch.equal(best_amp[name], best_fp32[name]) for name in best_fp32)


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
