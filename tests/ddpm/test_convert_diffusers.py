"""diffusers UNet2DModel (the paper's architecture) -> our UNet: same outputs, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from ddpm.config import UNetConfig
from ddpm.convert_diffusers import (DiffusersConversionError, convert_state_dict, load_diffusers_unet,
                                    unet_config_from_diffusers)
from ddpm.unet import UNet, count_parameters

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's config.json, as published.
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def _small(**overrides) -> dict:
    return {**CIFAR10_CONFIG, "block_out_channels": [32, 64, 64, 64], **overrides}


def _diffusers_model(cfg: dict) -> torch.nn.Module:
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():  # diffusers zero-inits nothing, but make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_cifar10_config_maps_to_the_preset():
    cfg = unet_config_from_diffusers(CIFAR10_CONFIG, dropout=0.1)
    assert cfg == UNetConfig.cifar10()
    assert count_parameters(UNet(cfg)) == 35_746_307


@pytest.mark.parametrize("overrides", [{}, {"out_channels": 6, "in_channels": 3}])
def test_converted_model_matches_diffusers(overrides):
    cfg = _small(**overrides)
    theirs = _diffusers_model(cfg)
    config = unet_config_from_diffusers(dict(theirs.config))
    ours = UNet(config).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()))
    assert count_parameters(ours) == count_parameters(theirs)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 731])
    with torch.no_grad():
        want = theirs(x, t).sample
        assert (ours(x, t) - want).abs().max() < 1e-4
        assert (ours(x.to(memory_format=torch.channels_last), t) - want).abs().max() < 1e-4


def test_class_conditional_model_matches_diffusers_and_its_null_class_is_no_class_embedding():
    """num_class_embeds=K -> model.num_classes=K: class c is diffusers' class_labels=c exactly; the
    null class K is diffusers' network with its class embedding removed (diffusers has no null class)."""
    theirs = _diffusers_model(_small(num_class_embeds=10))
    with torch.no_grad():
        theirs.class_embedding.weight.normal_()  # N(0, 1), as both inits leave it: labels then matter
    config = unet_config_from_diffusers(dict(theirs.config))
    assert config.num_classes == 10
    ours = UNet(config).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()))
    assert count_parameters(ours) == count_parameters(theirs) + ours.class_embed.weight.shape[1]  # the null row
    assert ours.class_embed.weight[10].abs().max() == 0
    x, t, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 731, 999]), torch.tensor([3, 0, 9])
    with torch.no_grad():
        want = theirs(x, t, class_labels=y).sample
        err = (ours(x, t, y) - want).abs().max()
        assert err < 1e-5
        assert (ours(x, t, y.flip(0)) - want).abs().max() > 100 * err + 1e-4  # the labels matter
        theirs.class_embedding = None  # diffusers' forward then adds no class embedding
        assert (ours(x, t) - theirs(x, t).sample).abs().max() < 1e-4  # y=None: the null class


def test_legacy_attention_names_convert():
    theirs = _diffusers_model(_small())
    legacy = {}
    for k, v in theirs.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert convert_state_dict(legacy).keys() == convert_state_dict(theirs.state_dict()).keys()


def test_load_diffusers_unet_from_a_saved_folder(tmp_path):
    theirs = _diffusers_model(_small())
    theirs.save_pretrained(tmp_path / "unet")
    config, sd = load_diffusers_unet(str(tmp_path))  # a pipeline folder holding unet/
    ours = UNet(config).eval()
    ours.load_state_dict(sd)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        assert (ours(x, t) - theirs(x, t).sample).abs().max() < 1e-4
    # a .bin checkpoint is read with weights_only
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(_small()))
    torch.save(theirs.state_dict(), tmp_path / "bin" / "diffusion_pytorch_model.bin")
    _, sd_bin = load_diffusers_unet(str(tmp_path / "bin"))
    assert all(torch.equal(sd_bin[k], v) for k, v in sd.items())


@pytest.mark.parametrize("overrides, match", [
    ({"downsample_padding": 1}, "downsample_padding.*SAME"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"freq_shift": 0}, "freq_shift"),
    ({"norm_eps": 1e-5}, "norm_eps"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     "down_block_types"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, "up_block_types"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ({"num_class_embeds": 10, "class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 10, "class_embed_type": "identity"}, "class_embed_type"),
    ({"block_out_channels": [32, 48, 64, 64]}, "block_out_channels"),
    ({"cross_attention_dim": 768}, "unsupported diffusers option.*cross_attention_dim"),
])
def test_other_architectures_are_refused(overrides, match):
    with pytest.raises(DiffusersConversionError, match=match):
        unet_config_from_diffusers(_small(**overrides))


def test_unmapped_keys_are_refused():
    with pytest.raises(DiffusersConversionError, match="no counterpart.*class_embedding.linear_1"):
        convert_state_dict({"class_embedding.linear_1.weight": torch.zeros(1)})  # a "timestep" class embedding
