"""The options for unseen data on the torch side: class weights, the balanced sampler, augmentation, padding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_pipeline.augment import RandomQuarterTurn, augmentation, balanced_order, class_weights
from anomaly_pipeline.images import PAD_COLOUR
from anomaly_pipeline.model import build_model, seed_everything
from anomaly_pipeline.tensors import load_image
from anomaly_pipeline.training import fit, validate
from tests.test_train import CPU, settings, tiny_data

RARE = torch.tensor([0] * 18 + [1] * 2)  # 1 faulty image in 10


def test_class_weights_make_both_classes_weigh_the_same() -> None:
    weights = class_weights(RARE)
    assert weights.tolist() == pytest.approx([20 / 36, 20 / 4])
    assert weights[RARE].sum().item() == pytest.approx(len(RARE))  # still a mean over the images
    assert (weights[RARE] * (RARE == 1)).sum() == pytest.approx((weights[RARE] * (RARE == 0)).sum())


def test_balanced_order_draws_each_class_half_the_time_and_repeats_with_its_seed() -> None:
    orders = [balanced_order(RARE, torch.Generator().manual_seed(seed)) for seed in range(200)]
    assert all(len(order) == len(RARE) for order in orders)
    share = torch.cat([RARE[order] for order in orders]).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.03)  # 4,000 draws; unbalanced they would be 10 % faulty
    again = balanced_order(RARE, torch.Generator().manual_seed(0))
    assert torch.equal(again, orders[0]) and not torch.equal(orders[0], orders[1])


def test_validation_loss_weighted_by_class_counts_a_missed_rare_defect_as_much_as_the_common_class() -> None:
    # A model that calls everything clean: plain cross-entropy is low (90 % right), the balanced one is not.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([2.0, -2.0]))
    images = torch.zeros((len(RARE), 3, 4, 4), dtype=torch.uint8)
    plain = validate(model, images, RARE, 8, CPU).loss
    balanced = validate(model, images, RARE, 8, CPU, balanced=True).loss
    right, wrong = (-torch.log_softmax(torch.tensor([2.0, -2.0]), 0)).tolist()
    assert plain == pytest.approx(0.9 * right + 0.1 * wrong, rel=1e-5)
    assert balanced == pytest.approx(0.5 * right + 0.5 * wrong, rel=1e-5)


@pytest.mark.parametrize("names", [["flip"], ["rotate90"], ["affine"], ["color"], ["flip", "rotate90", "affine", "color"]])
def test_each_augmentation_changes_images_and_repeats_with_the_seed(names: list[str]) -> None:
    images = tiny_data(3, 16)[0]
    augment = augmentation(names)
    torch.manual_seed(5)
    first = augment(images)
    torch.manual_seed(5)
    again = augment(images)
    torch.manual_seed(6)
    other = augment(images)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, images) and not torch.equal(first, other)
    assert augmentation([]) is None


def test_quarter_turns_are_exact_rotations() -> None:
    image = tiny_data(4, 1)[0][0]
    turns = {tuple(RandomQuarterTurn()(image).flatten().tolist()) for _ in range(40)}
    expected = {tuple(torch.rot90(image, k, dims=(1, 2)).flatten().tolist()) for k in range(4)}
    assert turns == expected


def test_training_with_sampler_weighted_loss_and_augmentation_is_bit_identical_when_rerun() -> None:
    images, labels = tiny_data(1, 16)[0], torch.tensor([0] * 13 + [1] * 3)

    def weights(**changes: object) -> list[torch.Tensor]:
        seed_everything(0)
        model = build_model("resnet18", None)
        best, _ = fit(model, (images, labels), tiny_data(2, 12), settings(max_epochs=2, **changes), CPU,
                      torch.Generator().manual_seed(0), run=0)
        return [tensor.clone() for tensor in best.values()]

    options = dict(class_balance="sampler", augment=["flip", "rotate90", "affine", "color"])
    first, again = weights(**options), weights(**options)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    plain = weights()
    assert not all(torch.equal(a, b) for a, b in zip(first, plain))
    weighted = weights(class_balance="weighted_loss")
    assert not all(torch.equal(a, b) for a, b in zip(weighted, plain))


def test_pad_keeps_the_aspect_ratio_and_fills_with_the_mean_colour(tmp_path: Path) -> None:
    # A 100 x 25 white strip: squashed it fills the square; padded it is a 32 x 8 band across the middle.
    path = tmp_path / "strip.png"
    Image.new("RGB", (100, 25), (255, 255, 255)).save(path)
    squashed, padded = load_image(path, 32, "squash").numpy(), load_image(path, 32, "pad").numpy()
    assert (squashed == 255).all()
    rows_white = np.flatnonzero((padded == 255).all(axis=(0, 2)))
    assert rows_white.tolist() == list(range(12, 20))
    assert (padded[:, 0, 0] == PAD_COLOUR).all() and (padded[:, -1, -1] == PAD_COLOUR).all()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    return {name for name in before if name.startswith(prefix) and not torch.equal(before[name], after[name])}


def test_head_epochs_train_the_classifier_alone_first_then_every_layer() -> None:
    """LP-FT: for train.head_epochs epochs nothing but the classifier changes (batch norm statistics included)."""
    seed_everything(0)
    model = build_model("resnet18", None)
    states = [snapshot(model)]
    _, history = fit(model, tiny_data(1, 16), tiny_data(2, 12), settings(min_epochs=3, max_epochs=3, head_epochs=2),
                     CPU, torch.Generator().manual_seed(0), run=0, on_epoch=lambda record: states.append(snapshot(model)))
    assert history["trained"].tolist() == ["classifier", "classifier", "all"]
    for epoch in (1, 2):
        assert changed(states[epoch - 1], states[epoch]) == {"fc.weight", "fc.bias"}
    assert {"conv1.weight", "bn1.running_mean", "layer4.1.conv2.weight"} <= changed(states[2], states[3])
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_backbone_learns_at_its_fraction_of_the_learning_rate() -> None:
    """Adam's first step moves each weight by about its learning rate: the classifier's train.lr, the rest's
    train.lr x train.backbone_lr_factor."""
    seed_everything(0)
    model = build_model("resnet18", None)
    before = snapshot(model)
    fit(model, tiny_data(1, 16), tiny_data(2, 12), settings(batch_size=16, lr=1e-2, min_epochs=1, max_epochs=1,
                                                            backbone_lr_factor=0.1), CPU,
        torch.Generator().manual_seed(0), run=0)
    after = snapshot(model)
    moved = {name: (after[name] - before[name]).abs().max().item() for name, _ in model.named_parameters()}
    assert max(moved["fc.weight"], moved["fc.bias"]) == pytest.approx(1e-2, rel=1e-3)
    backbone = max(value for name, value in moved.items() if not name.startswith("fc."))
    assert backbone == pytest.approx(1e-3, rel=1e-3)


def test_frozen_batch_norm_statistics_stay_as_loaded() -> None:
    seed_everything(0)
    model = build_model("resnet18", None)
    before = snapshot(model)
    fit(model, tiny_data(1, 16), tiny_data(2, 12), settings(max_epochs=2, freeze_bn_stats=True), CPU,
        torch.Generator().manual_seed(0), run=0)
    moved = changed(before, snapshot(model))
    assert not any(name.endswith(("running_mean", "running_var", "num_batches_tracked")) for name in moved)
    assert {"conv1.weight", "bn1.weight", "fc.weight"} <= moved


@pytest.mark.parametrize("changes, message", [
    ({"finetune": "head", "head_epochs": 1}, "train.head_epochs need 'train.finetune: all'"),
    ({"finetune": "last_block", "backbone_lr_factor": 0.1}, "train.backbone_lr_factor need 'train.finetune: all'"),
    ({"head_epochs": 6, "max_epochs": 6}, "'train.head_epochs' (6) must be below 'train.max_epochs' (6)"),
])
def test_the_recipe_options_are_refused_where_they_cannot_apply(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        settings(**changes)
