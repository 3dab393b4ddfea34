"""ContextUnet: a small class- and time-conditioned U-Net for any channel count and size.

The network takes noisy images ``x_t`` (B, C, H, W), integer timesteps ``t`` (B,) and class
labels ``y`` (B,) and returns a tensor shaped like ``x_t`` (eps, x0 or v, as the diffusion
objective says). Label index ``num_classes`` is the learned "no class" token used for
classifier-free guidance. Each resolution level halves H and W, so H and W must be divisible
by ``2 ** (len(channel_mults) - 1)``; nothing else about the size is fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from difflab.config import ModelConfig
from difflab.errors import UsageError


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal features of the timestep (Vaswani et al. 2017)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([args.sin(), args.cos()], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning applied as a scale and shift (FiLM)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions (used at the lowest resolution)."""

    def __init__(self, ch: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ContextUnet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.channel_mults)
        if cfg.patch_size < 1:
            raise UsageError(f"model.patch_size={cfg.patch_size}: must be 1 or more")
        factor = cfg.patch_size * 2 ** (levels - 1)
        if cfg.height % factor or cfg.width % factor:
            raise UsageError(
                f"model: {cfg.height}x{cfg.width} images do not fit patch_size {cfg.patch_size} and "
                f"{levels} levels; height and width must be multiples of {factor}"
            )
        self.patch = cfg.patch_size
        c_img = cfg.in_channels * cfg.patch_size**2  # channels after pixel unshuffle
        ch, emb_dim = cfg.base_channels, cfg.time_embed_dim
        self.num_classes = cfg.num_classes
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(ch), nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)  # last index: no class
        self.stem = nn.Conv2d(c_img, ch, 3, padding=1)

        widths = [ch * m for m in cfg.channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [], ch
        for i, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, w, emb_dim))
                c = w
                skips.append(c)
            self.down.append(blocks)
            last = i == levels - 1
            self.downsample.append(
                nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1)
            )

        self.mid1 = ResBlock(c, c, emb_dim)
        self.mid_attn = Attention(c) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c + skips.pop(), w, emb_dim))
                c = w
            self.up.append(blocks)
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())

        self.out = nn.Sequential(
            nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c_img, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) int timesteps; y: (B,) int labels, num_classes = no class."""
        emb = self.time_embed(t) + self.class_embed(y)  # (B, emb_dim)
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)  # (B, C*p*p, H/p, W/p)
        h = self.stem(x)
        skips = []
        for blocks, down in zip(self.down, self.downsample, strict=True):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.up, self.upsample, strict=True):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.out(h)
        return F.pixel_shuffle(h, self.patch) if self.patch > 1 else h

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
