"""The model comes from torchvision's weights API: a TORCH_HOME cache is used offline; no cache offline is a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

from anomaly_pipeline.errors import PipelineError
from anomaly_pipeline.model import build_model, fetch_pretrained_state
from tests.conftest import SMALL, make_project, run, write_params

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


def test_offline_without_cache_names_both_remedies(offline: Path) -> None:
    with pytest.raises(PipelineError) as error:
        fetch_pretrained_state("resnet18")
    assert "TORCH_HOME" in str(error.value) and "model.pretrained: false" in str(error.value)


def test_train_stage_stops_offline_before_any_training(offline: Path, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    write_params(project, {**SMALL, "model.pretrained": True, "data.dir": str(tmp_path / "not-read")})
    result = run([sys.executable, "-m", "stages.train", "--run", "0"], project, check=False)
    assert result.returncode == 1
    assert "TORCH_HOME" in result.stderr and "model.pretrained: false" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "runs").exists()
