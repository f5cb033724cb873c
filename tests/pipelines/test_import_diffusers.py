"""`ddpm-pipe import-diffusers`: a random diffusers UNet2DModel of the paper's architecture, registered,
gives the same outputs as diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import cli_json, perturbed, run_cli

pytest.importorskip("diffusers", reason="diffusers is not installed (the `diffusers` extra; `make setup` has it)")


def paper_unet(seed: int = 0, num_class_embeds: int | None = None):
    """The paper's architecture (diffusers' google/ddpm-cifar10-32 options), small channels for speed;
    class-conditional with ``num_class_embeds``."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(num_class_embeds=num_class_embeds,
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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("damage", ["config-list", "config-json", "bin", "safetensors", "protocol"])
def test_damaged_files_and_unknown_places_are_usage_errors(tmp_path, damage):
    """Issue 25 (exit codes): what is wrong with the input is exit 2 with the file named, not exit 1."""
    unet = paper_unet()
    folder = tmp_path / "unet"
    unet.save_pretrained(folder, safe_serialization=damage != "bin")
    path, want = str(folder), None
    if damage == "config-list":
        (folder / "config.json").write_text("[1, 2]")
        want = "config.json: holds a list"
    elif damage == "config-json":
        (folder / "config.json").write_text("{not json")
        want = "config.json: not valid JSON"
    elif damage == "bin":
        (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02junk that does not unpickle")
        want = "diffusion_pytorch_model.bin: not readable weights"
    elif damage == "safetensors":
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
        want = "diffusion_pytorch_model.safetensors: not readable weights"
    else:
        path, want = "foo://bucket/unet", "cannot open (Protocol not known: foo)"
    result = run_cli("import-diffusers", "--path", path, "--name", "x")
    assert result.exit_code == 2 and want in result.output, result.output


def test_a_class_conditional_model_imports_and_matches_diffusers_for_every_class(tmp_path):
    """num_class_embeds=10 -> a model of 10 classes: class c gives diffusers' output with
    class_labels=c; the version says it is class-conditional; sampling takes --class."""
    from pipelines import tracking
    from pipelines.registry import models

    unet = paper_unet(num_class_embeds=10)
    unet.save_pretrained(tmp_path / "unet")
    result = run_cli("import-diffusers", "--path", str(tmp_path / "unet"), "--name", "hub-cond", "--json")
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert out["num_classes"] == 10 and "class-conditional on 10 classes" in out["message"]
    loaded = models.load(out["model_uri"])
    assert loaded.config.model.num_classes == 10
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 487, 999, 250])
    y = torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        ours = loaded.model(x, t, y)
        theirs = unet(x, t, class_labels=y).sample
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours[1] - loaded.model(x, t, torch.tensor([0, 4, 9, 3]))[1]).abs().max().item() > 1e-3  # classes matter
    description = tracking.client().get_model_version("hub-cond", out["version"]).description
    assert "class-conditional on 10 classes, labels 0..9, label 10 the null class" in description
    sampled = run_cli("sample", "--model", out["model_uri"], "--num", "2", "--class", "7", "--guidance", "2",
                      "--sampler", "ddim", "--steps", "2", "--format", "npz", "--out", str(tmp_path / "s"), "--json")
    assert sampled.exit_code == 0, sampled.output
    assert cli_json(sampled)["classes"] == [7]
