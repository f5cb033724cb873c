"""The noise-prediction U-Net of Ho et al. (2020), appendix B.

A PixelCNN++-style backbone: wide residual blocks with GroupNorm and a timestep projection,
single-head self-attention at chosen resolutions (16x16 for CIFAR-10), conv resampling, and skip
connections from every down-path block to the up path. The CIFAR-10 preset has 35.7M parameters.

State-dict layout (``up`` is indexed in execution order, lowest resolution first, as in diffusers'
``UNet2DModel``, so a checkpoint of that model converts by renaming; see ``convert_diffusers.py``)::

    time_embed.{0,2}                      Linear(ch, 4ch), SiLU, Linear(4ch, 4ch)
    class_embed                           Embedding(num_classes + 1, 4ch), only when num_classes > 0
    conv_in
    down.{level}.res.{j}                  ResBlock: norm1 conv1 temb_proj norm2 conv2 [shortcut]
    down.{level}.attn.{j}                 AttentionBlock: norm qkv proj_out (only at attn_resolutions)
    down.{level}.downsample.conv          (all levels but the last)
    mid.res1, mid.attn, mid.res2
    up.{i}.res.{j}, up.{i}.attn.{j}       num_res_blocks + 1 blocks, each eating one skip
    up.{i}.upsample.conv                  (all but the last)
    norm_out, conv_out

The network knows nothing about betas: it maps (x_t, t) to an output of ``config.out_channels``
channels and is always called with the original training timestep ``t``. A class-conditional model
(``config.num_classes = K > 0``) also takes labels y in [0, K], K being the "null" class of
classifier-free guidance (Ho & Salimans 2021); its learned embedding is added to the timestep
embedding, as in improved-diffusion (``class_cond``) and diffusers (``num_class_embeds``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import UNetConfig

GROUPNORM_EPS = 1e-6  # the TF implementation's tf.contrib.layers.group_norm default


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer (a divisor of ``channels``) for narrow layers."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=GROUPNORM_EPS)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the paper's TF code.

    :param t: [N] timesteps.
    :return: [N x dim] float32, ``[sin(t * f_i), cos(t * f_i)]`` with
        ``f_i = max_period ** (-i / (dim/2 - 1))`` (diffusers: ``flip_sin_to_cos=False, freq_shift=1``).
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on the timestep embedding.

    GroupNorm -> SiLU -> conv3x3, + Linear(SiLU(emb)), GroupNorm -> SiLU -> dropout -> conv3x3,
    plus a 1x1 shortcut when the channel count changes. With ``resample`` ("up"/"down") it also
    changes the resolution (BigGAN-style, ``UNetConfig.resblock_updown``).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float,
                 resample: Literal["up", "down"] | None = None) -> None:
        super().__init__()
        self.resample = resample
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """:param x: [N x in_ch x H x W]. :param emb: [N x emb_ch], already passed through SiLU."""
        h = F.silu(self.norm1(x))
        if self.resample:
            h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        h = h + self.temb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)  # one matmul for q, k and v
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # [N x C x H x W] -> [N x HW x C]; a free view for channels_last input.
        h = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.num_heads, c // self.num_heads)).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # [N x heads x HW x C/heads], scale 1/sqrt(C/heads)
        h = self.proj_out(h.transpose(1, 2).flatten(2))
        return x + h.transpose(1, 2).unflatten(2, (height, width))


class Downsample(nn.Module):
    """Strided conv3x3 with TF "SAME" padding (zero pad right and bottom only), as in the paper."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """One resolution of the down path: residual blocks, optional attention, a downsampler."""

    def __init__(self, res: list[ResBlock], attn: list[AttentionBlock], downsample: nn.Module | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per residual block
        self.downsample = downsample


class UpLevel(nn.Module):
    """One resolution of the up path: residual blocks on skip concatenations, attention, an upsampler."""

    def __init__(self, res: list[ResBlock], attn: list[AttentionBlock], upsample: nn.Module | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.upsample = upsample


class MiddleBlock(nn.Module):
    def __init__(self, channels: int, emb_ch: int, dropout: float, num_heads: int) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_ch, dropout)
        self.attn = AttentionBlock(channels, num_heads)
        self.res2 = ResBlock(channels, channels, emb_ch, dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, emb)), emb)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]) (or x_0 / v, depending on the diffusion's parameterization).

    :param config: the architecture; ``UNetConfig.cifar10()`` is the paper's 35.7M model.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, emb_ch, dropout = config.ch, 4 * config.ch, config.dropout
        sizes = [config.image_size // 2**i for i in range(len(config.ch_mult))]
        unknown = sorted(set(config.attn_resolutions) - set(sizes))
        if unknown:
            raise ValueError(f"model.attn_resolutions has {unknown}, which no level has; "
                             f"the level sizes are {sizes}")

        def resampler(channels: int, down: bool) -> nn.Module:
            if config.resblock_updown:
                return ResBlock(channels, channels, emb_ch, dropout, resample="down" if down else "up")
            return Downsample(channels) if down else Upsample(channels)

        def attention(channels: int, size: int, n: int) -> list[AttentionBlock]:
            if size not in config.attn_resolutions:
                return []
            return [AttentionBlock(channels, config.num_heads) for _ in range(n)]

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if config.num_classes:  # absent when unconditional: the paper's state dict is unchanged
            self.class_embed = nn.Embedding(config.num_classes + 1, emb_ch)  # the last row: the null class
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        skip_channels = [ch]  # channels of every tensor the down path hands to the up path
        cur = ch
        self.down = nn.ModuleList()
        for level, (mult, size) in enumerate(zip(config.ch_mult, sizes)):
            res = []
            for _ in range(config.num_res_blocks):
                res.append(ResBlock(cur, mult * ch, emb_ch, dropout))
                cur = mult * ch
                skip_channels.append(cur)
            last = level == len(config.ch_mult) - 1
            downsample = None if last else resampler(cur, True)
            self.down.append(DownLevel(res, attention(cur, size, len(res)), downsample))
            if not last:
                skip_channels.append(cur)

        self.mid = MiddleBlock(cur, emb_ch, dropout, config.num_heads)

        self.up = nn.ModuleList()
        for level in reversed(range(len(config.ch_mult))):
            out_ch = config.ch_mult[level] * ch
            res = []
            for _ in range(config.num_res_blocks + 1):
                res.append(ResBlock(cur + skip_channels.pop(), out_ch, emb_ch, dropout))
                cur = out_ch
            self.up.append(UpLevel(res, attention(cur, sizes[level], len(res)),
                                 resampler(cur, False) if level else None))

        self.norm_out = group_norm(cur)
        self.conv_out = nn.Conv2d(cur, config.out_channels, 3, padding=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The TF code's init: Xavier-uniform weights, zero biases, and zero for the last layer of
        every residual branch (conv2, attention proj_out) and for conv_out, so each block starts
        as the identity and the network starts at 0. Class embeddings are N(0, 1) (torch's default, as
        improved-diffusion and diffusers leave them)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttentionBlock):
                nn.init.zeros_(m.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)
        if self.config.num_classes:
            nn.init.normal_(self.class_embed.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [N x C x H x W] noisy images x_t (channels_last works and is kept).
        :param t: [N] original training timesteps (int64; floats are accepted), or a scalar.
        :param y: [N] int64 class labels in [0, num_classes], ``num_classes`` being the null class;
            ``None`` is the null class. Only for a class-conditional model. Their range is checked
            where they enter (:func:`ddpm.guidance.check_class_labels`), not here (no host sync).
        :return: [N x out_channels x H x W].
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"UNet expects x of shape (N, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet expects t of shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")

        emb = self.time_embed(timestep_embedding(t, cfg.ch).to(self.conv_in.weight.dtype))
        if cfg.num_classes:
            emb = emb + self.class_embed(self._labels(y, x.shape[0], x.device))
        elif y is not None:
            raise ValueError("class labels given to an unconditional model (model.num_classes=0); "
                             "train with model.num_classes=K to condition on K classes")
        emb = F.silu(emb)  # every ResBlock applies SiLU before its projection: do it once

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(h, emb)
                if level.attn:
                    h = level.attn[i](h)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h, emb)
                skips.append(h)

        h = self.mid(h, emb)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                if level.attn:
                    h = level.attn[i](h)
            if level.upsample is not None:
                h = level.upsample(h, emb)

        return self.conv_out(F.silu(self.norm_out(h)))

    def _labels(self, y: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        """``y`` as [n] int64 on ``device``; ``None``: the null class for every row."""
        if y is None:
            return torch.full((n,), self.config.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device)
        if y.shape != (n,) or y.is_floating_point() or y.is_complex():
            raise ValueError(f"UNet expects class labels y of shape ({n},) and an integer dtype to match x, "
                             f"got {tuple(y.shape)} {y.dtype}")
        return y


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
