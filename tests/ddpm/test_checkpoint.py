"""Checkpoints: round trips, atomic writes, refusal of code-carrying pickles, clear errors."""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import replace

import pytest
import torch

import ddpm
from ddpm.checkpoint import (FORMAT_VERSION, CheckpointError, export_weights, import_weights,
                             load_checkpoint, load_model, save_checkpoint)
from ddpm.config import ExperimentConfig
from ddpm.diffusion import Diffusion
from ddpm.ema import EMA
from ddpm.unet import UNet
from tests.support import perturbed, tiny_unet_config

TINY = tiny_unet_config(32, attention=True)


@pytest.fixture
def config() -> ExperimentConfig:
    return replace(ExperimentConfig.preset("digits"), model=TINY)


def _trained_state(config: ExperimentConfig) -> tuple[UNet, EMA, dict]:
    torch.manual_seed(0)
    model = UNet(config.model)
    ema = EMA(model, decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    perturbed(model, scale=1.0)
    opt.step()
    ema.update(model)
    state = {"config": config, "model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": opt.state_dict(), "step": 1, "rng": torch.get_rng_state()}
    return model, ema, state


def test_round_trip(tmp_path, config):
    model, ema, state = _trained_state(config)
    url = str(tmp_path / "ckpt" / "step-1.pt")
    save_checkpoint(url, state)
    loaded = load_checkpoint(url)
    assert loaded["config"] == config
    assert loaded["format_version"] == FORMAT_VERSION and loaded["ddpm_version"] == ddpm.__version__
    assert loaded["step"] == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded["model"][k], v)
    restored = EMA(UNet(config.model), decay=0.9)
    restored.load_state_dict(loaded["ema"])
    assert restored.num_updates == 1
    opt = torch.optim.Adam(UNet(config.model).parameters())
    opt.load_state_dict(loaded["optimizer"])
    assert os.listdir(tmp_path / "ckpt") == ["step-1.pt"]  # no temporary left behind


def test_config_is_stored_as_json(tmp_path, config):
    _, _, state = _trained_state(config)
    save_checkpoint(str(tmp_path / "c.pt"), state)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert json.loads(raw["config"]) == config.to_dict()


def test_overwrite_is_atomic_replace(tmp_path, config):
    _, _, state = _trained_state(config)
    url = f"file://{tmp_path}/c.pt"
    save_checkpoint(url, {**state, "step": 1})
    save_checkpoint(url, {**state, "step": 2})
    assert load_checkpoint(url)["step"] == 2
    assert os.listdir(tmp_path) == ["c.pt"]


def test_memory_filesystem(config):
    _, _, state = _trained_state(config)
    save_checkpoint("memory://ckpts/c.pt", state)
    assert load_checkpoint("memory://ckpts/c.pt")["step"] == 1


def test_non_primitive_values_are_refused_at_save(tmp_path, config):
    _, _, state = _trained_state(config)
    with pytest.raises(TypeError, match=r"state\['extra'\]"):
        save_checkpoint(str(tmp_path / "c.pt"), {**state, "extra": object()})


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"format_version": 1, "model": _Exploit(str(marker))}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"refused.*GLOBAL \S*system"):
        load_checkpoint(str(path))
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"  # a bare pickle, not a torch zip file
    plain.write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(str(plain))
    assert not marker.exists()


def test_wrong_format_version_is_a_clear_error(tmp_path, config):
    _, _, state = _trained_state(config)
    url = str(tmp_path / "c.pt")
    save_checkpoint(url, state)
    raw = torch.load(url, weights_only=True)
    torch.save({**raw, "format_version": 99}, url)
    with pytest.raises(CheckpointError, match="format version 99.*reads format 1"):
        load_checkpoint(url)


def test_missing_keys_and_foreign_files_are_clear_errors(tmp_path):
    url = str(tmp_path / "c.pt")
    torch.save({"model": {}}, url)
    with pytest.raises(CheckpointError, match="missing key.*format_version.*config"):
        load_checkpoint(url)
    torch.save([1, 2], url)
    with pytest.raises(CheckpointError, match="not a ddpm checkpoint"):
        load_checkpoint(url)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    assert issubclass(CheckpointError, ValueError)


def test_config_that_does_not_build_is_a_clear_error(tmp_path, config):
    _, _, state = _trained_state(config)
    data = config.to_dict()
    data["model"]["wings"] = 2
    url = str(tmp_path / "c.pt")
    save_checkpoint(url, {**state, "config": json.dumps(data)})
    with pytest.raises(CheckpointError, match="config does not build.*wings"):
        load_checkpoint(url)


def test_load_model_uses_ema_weights_in_eval_mode(tmp_path, config):
    model, ema, state = _trained_state(config)
    url = str(tmp_path / "c.pt")
    save_checkpoint(url, state)
    cfg, loaded, diffusion = load_model(url)
    assert cfg == config and not loaded.training and isinstance(diffusion, Diffusion)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert not torch.equal(loaded.state_dict()["conv_in.weight"], model.state_dict()["conv_in.weight"])
    assert diffusion.num_timesteps == config.diffusion.timesteps
    _, raw, _ = load_model(url, weights="model")
    torch.testing.assert_close(raw.state_dict()["conv_in.weight"], model.state_dict()["conv_in.weight"])
    del state["ema"]
    save_checkpoint(url, state)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_model(url)


def test_export_import_weights(tmp_path, config):
    _, ema, _ = _trained_state(config)
    folder = str(tmp_path / "artifact")
    module = ema.module.eval()
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    export_weights(module.to(memory_format=torch.channels_last), folder, config)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    doc = json.loads((tmp_path / "artifact" / "config.json").read_text())
    assert doc["ddpm_version"] == ddpm.__version__ and doc["config"] == config.to_dict()
    cfg, model = import_weights(folder)
    assert cfg == config and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]) and v.is_contiguous()
    if _has_diffusion():
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([4, 400])
        cfg2, model2, _ = load_model(folder)
        torch.testing.assert_close(model2(x, t), model(x, t))


def test_import_weights_errors(tmp_path, config):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_weights(str(tmp_path))
    folder = tmp_path / "a"
    export_weights(UNet(config.model), str(folder), config)
    other = replace(config, model=replace(TINY, ch=64))
    doc = json.loads((folder / "config.json").read_text())
    doc["config"] = other.to_dict()
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="do not fit"):
        import_weights(str(folder))


def _has_diffusion() -> bool:
    try:
        import ddpm.diffusion  # noqa: F401
    except ImportError:
        return False
    return True
