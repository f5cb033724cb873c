"""Convert a diffusers ``UNet2DModel`` of the paper's architecture (e.g. ``google/ddpm-cifar10-32``).

Only the DDPM architecture converts: positional timestep embedding with ``flip_sin_to_cos=False,
freq_shift=1``, SiLU, GroupNorm(32, eps 1e-6), "default" time conditioning, conv resampling with TF
"SAME" padding (``downsample_padding=0``), plain/attention down and up blocks mirroring each other,
and the ``UNetMidBlock2D``. Anything else is refused with the offending option named.

The state dict converts by renaming, plus concatenating ``to_q/to_k/to_v`` into our fused ``qkv``.
Both the current attention names (``to_q``, ``to_out.0``) and the legacy ones of older hub
checkpoints (``query``, ``proj_attn``) are understood.

A class-conditional model (``num_class_embeds = K``, ``class_embed_type`` None: an ``nn.Embedding``
added to the timestep embedding, as ours) converts to ``model.num_classes = K``. diffusers has no
null class (its forward requires ``class_labels``); the converted model's null class K gets a zero
embedding, so it computes the diffusers network with no class embedding added (diffusers' own forward
with ``class_embedding`` removed). Classes 0..K-1 are exact; guidance (w != 1) is only meaningful if
the model was trained to be unconditional that way, which diffusers' training scripts do not do.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ddpm.config import UNetConfig
from ddpm.unet import GROUPNORM_EPS


class DiffusersConversionError(ValueError):
    """The diffusers model is not one this package's U-Net can represent."""


# Options whose value must be exactly this for the paper's architecture (None means "absent").
_REQUIRED = {
    "_class_name": "UNet2DModel",
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_num_groups": 32,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,  # None with num_class_embeds: an nn.Embedding; "timestep"/"identity" are other maps
}
_WHY = {
    "downsample_padding": "the paper pads right/bottom before its stride-2 conv (TF 'SAME')",
    "freq_shift": "the paper's embedding divides by (dim/2 - 1)",
    "flip_sin_to_cos": "the paper's embedding is [sin, cos]",
}
# Options read below, or harmless for inference.
_KNOWN = {"sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
          "down_block_types", "up_block_types", "attention_head_dim", "norm_eps", "dropout",
          "time_embedding_dim", "attn_norm_num_groups", "num_train_timesteps", "num_class_embeds"}


def _fail(key: str, value: Any, expected: Any) -> DiffusersConversionError:
    why = f" ({_WHY[key]})" if key in _WHY else ""
    return DiffusersConversionError(
        f"diffusers option {key}={value!r} is not the paper's architecture; expected {expected!r}{why}")


def unet_config_from_diffusers(cfg: Mapping[str, Any], dropout: float | None = None) -> UNetConfig:
    """Map a ``UNet2DModel`` config (its ``config.json`` as a dict) to a :class:`UNetConfig`.

    :param dropout: override the dropout rate (diffusers configs often store 0.0 for inference).
    :raises DiffusersConversionError: the config describes another architecture.
    """
    for key, expected in _REQUIRED.items():
        if key in cfg and cfg[key] != expected and not (key == "_class_name" and cfg[key] is None):
            raise _fail(key, cfg[key], expected)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _REQUIRED and k not in _KNOWN
                     and cfg[k] not in (None, False))
    if unknown:
        raise DiffusersConversionError(f"unsupported diffusers option(s): {', '.join(unknown)}")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "in_channels", "sample_size"):
        if key not in cfg:
            raise DiffusersConversionError(f"diffusers config lacks {key!r}")

    channels = [int(c) for c in cfg["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels) or any(c % 32 for c in channels):
        raise _fail("block_out_channels", channels, "multiples of the first entry and of 32")
    eps = float(cfg.get("norm_eps", 1e-5))
    if not math.isclose(eps, GROUPNORM_EPS, rel_tol=1e-6):
        raise _fail("norm_eps", eps, GROUPNORM_EPS)
    if cfg.get("time_embedding_dim") not in (None, 4 * ch):
        raise _fail("time_embedding_dim", cfg["time_embedding_dim"], 4 * ch)
    if cfg.get("attn_norm_num_groups") not in (None, 32):
        raise _fail("attn_norm_num_groups", cfg["attn_norm_num_groups"], None)

    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    if len(down) != len(channels) or any(d not in kinds for d in down):
        raise _fail("down_block_types", down, f"{len(channels)} of {sorted(kinds)}")
    mirrored = ["AttnUpBlock2D" if kinds[d] else "UpBlock2D" for d in reversed(down)]
    if up != mirrored:
        raise _fail("up_block_types", up, mirrored)

    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _fail("sample_size", size, "a square size")
        size = size[0]
    size = int(size)
    attn_resolutions = tuple(size // 2**i for i, d in enumerate(down) if kinds[d])

    # attention_head_dim=None: one head per block; an int d gives channels // d heads, which must be
    # the same number everywhere (mid block included) since UNetConfig has one num_heads.
    head_dim = cfg.get("attention_head_dim")
    num_heads = 1
    if head_dim is not None:
        attn_channels = [c for c, d in zip(channels, down) if kinds[d]] + [channels[-1]]
        heads = {c // int(head_dim) for c in attn_channels}
        if len(heads) != 1 or any(c % int(head_dim) for c in attn_channels):
            raise _fail("attention_head_dim", head_dim, "a head count equal in every attention block")
        num_heads = heads.pop()

    num_classes = int(cfg.get("num_class_embeds") or 0)
    if num_classes < 0:
        raise _fail("num_class_embeds", cfg["num_class_embeds"], "a number of classes >= 1, or None")
    in_ch = int(cfg["in_channels"])
    out_ch = int(cfg.get("out_channels", in_ch))
    if out_ch not in (in_ch, 2 * in_ch):
        raise _fail("out_channels", out_ch, f"{in_ch} or {2 * in_ch} (learned variance)")
    return UNetConfig(
        image_size=size, in_channels=in_ch, ch=ch, ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=int(cfg.get("layers_per_block", 2)), attn_resolutions=attn_resolutions,
        dropout=float(cfg.get("dropout", 0.0)) if dropout is None else dropout,
        num_heads=num_heads, learn_sigma=out_ch == 2 * in_ch, resblock_updown=False, num_classes=num_classes,
    )


# (pattern on a diffusers key, replacement) applied in order; the first match wins.
_RENAMES = [
    (r"^time_embedding\.linear_1\.", "time_embed.0."),
    (r"^time_embedding\.linear_2\.", "time_embed.2."),
    (r"^class_embedding\.weight$", "class_embed.weight"),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^(conv_in|conv_out)\.", r"\1."),
    (r"^mid_block\.resnets\.0\.", "mid.res1."),
    (r"^mid_block\.resnets\.1\.", "mid.res2."),
    (r"^mid_block\.attentions\.0\.", "mid.attn."),
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.res."),
    (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.(conv|Conv2d_0)\.", r"down.\1.downsample.conv."),
    (r"^up_blocks\.(\d+)\.resnets\.", r"up.\1.res."),
    (r"^up_blocks\.(\d+)\.attentions\.", r"up.\1.attn."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"up.\1.upsample.conv."),
]
_LEAF_RENAMES = [  # inside a block
    (r"\.time_emb_proj\.", ".temb_proj."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.(to_out\.0|proj_attn)\.", ".proj_out."),
]
_QKV = re.compile(r"^(.*)\.(to_q|to_k|to_v|query|key|value)\.(weight|bias)$")
_QKV_INDEX = {"to_q": 0, "to_k": 1, "to_v": 2, "query": 0, "key": 1, "value": 2}


def convert_state_dict(diffusers_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``UNet2DModel`` state dict to :class:`ddpm.unet.UNet`'s layout.

    :raises DiffusersConversionError: a key has no counterpart, or q/k/v are incomplete.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}
    unmapped = []
    for key, value in diffusers_sd.items():
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        else:
            unmapped.append(key)
            continue
        for pattern, repl in _LEAF_RENAMES:
            new = re.sub(pattern, repl, new)
        match = _QKV.match(new)
        if match:
            block, name, param = match.groups()
            qkv.setdefault(f"{block}.qkv.{param}", [None, None, None])[_QKV_INDEX[name]] = value
        else:
            out[new] = value
    if unmapped:
        raise DiffusersConversionError(f"diffusers keys with no counterpart: {', '.join(unmapped[:8])}"
                                       + (" ..." if len(unmapped) > 8 else ""))
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise DiffusersConversionError(f"{key}: diffusers state dict lacks one of q, k, v")
        out[key] = torch.cat(parts, dim=0)  # Linear weights [C x C] -> [3C x C]; biases [C] -> [3C]
    if "class_embed.weight" in out:  # [K x 4ch] + the null class's row: zero, no class embedding
        classes = out["class_embed.weight"]
        out["class_embed.weight"] = torch.cat([classes, classes.new_zeros(1, classes.shape[1])])
    return out


def load_diffusers_unet(folder: str, storage_options: dict | None = None) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """Read a saved ``UNet2DModel`` (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``) from a local path or fsspec URL and convert it. A pipeline folder (with ``unet/``) works too.

    :return: (our UNetConfig, a state dict for :class:`ddpm.unet.UNet`).
    """
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    except (ValueError, ImportError) as e:  # an unknown protocol, or its package not installed
        raise DiffusersConversionError(f"{folder}: cannot open ({e})") from None
    root = root.rstrip("/")
    if not fs.exists(f"{root}/config.json") and fs.exists(f"{root}/unet/config.json"):
        root = f"{root}/unet"
    if not fs.exists(f"{root}/config.json"):
        raise DiffusersConversionError(f"{folder}: no config.json (not a saved diffusers UNet2DModel)")
    with fs.open(f"{root}/config.json", "r") as f:
        try:
            raw = json.load(f)
        except ValueError as e:
            raise DiffusersConversionError(f"{root}/config.json: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DiffusersConversionError(f"{root}/config.json: holds a {type(raw).__name__}, not a UNet2DModel "
                                       "config (a JSON object)")
    config = unet_config_from_diffusers(raw)

    st, pt = f"{root}/diffusion_pytorch_model.safetensors", f"{root}/diffusion_pytorch_model.bin"
    try:
        if fs.exists(st):
            from safetensors.torch import load as load_safetensors

            sd = load_safetensors(fs.cat_file(st))
        elif fs.exists(pt):
            sd = torch.load(io.BytesIO(fs.cat_file(pt)), map_location="cpu", weights_only=True)
        else:
            raise DiffusersConversionError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")
    except DiffusersConversionError:
        raise
    except Exception as e:  # unpicklable, truncated, or not weights only: the file is bad input, not a crash
        name = st if fs.exists(st) else pt
        raise DiffusersConversionError(f"{name}: not readable weights ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict):
        raise DiffusersConversionError(f"{pt}: holds a {type(sd).__name__}, not a state dict")
    return config, convert_state_dict(sd)
