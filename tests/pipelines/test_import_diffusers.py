"""`ddpm-pipe import-diffusers`: a random diffusers UNet2DModel of the paper's architecture, registered,
gives the same outputs as diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import cli_json, perturbed, run_cli

pytest.importorskip("diffusers", reason="diffusers is not installed (the `diffusers` extra; `make setup` has it)")


def paper_unet(seed: int = 0):
    """The paper's architecture (diffusers' google/ddpm-cifar10-32 options), small channels for speed."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        act_fn="silu", norm_num_groups=32, time_embedding_type="positional", resnet_time_scale_shift="default",
        dropout=0.0,
    )
    return perturbed(unet).eval()  # every weight random and non-zero, so a mis-mapped one shows


@pytest.mark.timeout(180)
def test_imported_model_matches_diffusers(tmp_path):
    from pipelines.registry import models

    unet = paper_unet()
    unet.save_pretrained(tmp_path / "unet")
    result = run_cli("import-diffusers", "--path", str(tmp_path / "unet"), "--name", "hub",
                                      "--json")
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert out["model_uri"] == "models:/hub/1"

    loaded = models.load(out["model_uri"])
    cfg = loaded.config
    assert (cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.data.levels) == ("linear", 1000, 256)
    assert cfg.model.ch == 32 and cfg.model.attn_resolutions == (4,)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 487, 999])
    with torch.no_grad():
        ours = loaded.model(x, t)
        theirs = unet(x, t).sample
    assert (ours - theirs).abs().max().item() < 1e-4


def test_not_the_papers_architecture_is_a_usage_error(tmp_path):
    unet = paper_unet()
    unet.save_pretrained(tmp_path / "unet")
    cfg_path = tmp_path / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["flip_sin_to_cos"] = True
    cfg_path.write_text(json.dumps(cfg))
    result = run_cli("import-diffusers", "--path", str(tmp_path / "unet"), "--name", "x")
    assert result.exit_code == 2 and "flip_sin_to_cos" in result.output
