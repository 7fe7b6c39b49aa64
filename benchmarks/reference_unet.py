"""The reference design's 3D U-Net, re-implemented for side-by-side timing (``benchmarks/unet.py``).

The official LFDM code uses lucidrains' video-diffusion U-Net: 5-D tensors ``(B, C, F, H, W)`` through
Conv3d with (1, k, k) kernels, GroupNorm over the whole clip, *linear* spatial attention at every level
(softmax over q's features and k's positions, Shen et al.), full spatial attention only in the middle,
temporal attention written as einsum + softmax with a rotary embedding and a T5 relative position bias,
and classifier-free guidance as two forward passes. Same widths, levels and conditioning (z0 concatenated,
time MLP ⊕ text embedding) as :class:`lfdm.models.unet3d.Unet3D`, so the two differ only in those
choices. Not part of the library: nothing but the benchmark imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lfdm.config import UNetConfig
from lfdm.models.unet3d import RelativePositionBias, SinusoidalPosEmb


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = rearrange(x, "... (d r) -> ... d r", r=2).unbind(-1)
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d r -> ... (d r)")


class Rotary(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer(
            "inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim), persistent=False
        )

    def forward(self, t: Tensor) -> Tensor:  # (..., n, d)
        freqs = torch.einsum("n,f->nf", torch.arange(t.shape[-2], device=t.device).float(), self.inv_freq)
        freqs = torch.repeat_interleave(freqs, 2, dim=-1)
        return t * freqs.cos() + rotate_half(t) * freqs.sin()


class EinsumAttention(nn.Module):
    """Softmax attention as einsum (the reference's temporal and middle attention); tokens ``(N, L, C)``."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary: bool) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.rotary = Rotary(min(32, dim_head)) if rotary else None

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        q, k, v = rearrange(
            self.to_qkv(self.norm(x)), "n l (three h d) -> three n h l d", three=3, h=self.heads
        )
        q = q * self.scale
        if self.rotary is not None:
            r = self.rotary.inv_freq.numel() * 2
            q = torch.cat((self.rotary(q[..., :r]), q[..., r:]), dim=-1)
            k = torch.cat((self.rotary(k[..., :r]), k[..., r:]), dim=-1)
        sim = torch.einsum("nhid,nhjd->nhij", q, k)
        if bias is not None:
            sim = sim + bias
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = torch.einsum("nhij,nhjd->nhid", attn, v)
        return x + self.to_out(rearrange(out, "n h l d -> n l (h d)"))


class SpatialLinearAttention(nn.Module):
    """Linear attention over each frame's H·W positions: ``(B, C, F, H, W)`` → same shape."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = nn.GroupNorm(1, dim)
        self.to_qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w = x.shape[0], *x.shape[-2:]
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        q, k, v = rearrange(
            self.to_qkv(self.norm(frames)), "n (three h d) x y -> three n h d (x y)", three=3, h=self.heads
        )
        q, k = q.softmax(dim=-2) * self.scale, k.softmax(dim=-1)
        context = torch.einsum("nhdi,nhei->nhde", k, v)
        out = rearrange(torch.einsum("nhde,nhdi->nhei", context, q), "n h e (x y) -> n (h e) x y", x=h, y=w)
        return x + rearrange(self.to_out(out), "(b f) c h w -> b c f h w", b=b)


class Temporal(EinsumAttention):
    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # (B, C, F, H, W)
        h, w = x.shape[-2:]
        out = super().forward(rearrange(x, "b c f h w -> (b h w) f c"), bias)
        return rearrange(out, "(b h w) f c -> b c f h w", h=h, w=w)


class MidSpatial(EinsumAttention):
    def forward(self, x: Tensor) -> Tensor:
        b, h = x.shape[0], x.shape[-2]
        out = super().forward(rearrange(x, "b c f h w -> (b f) (h w) c"))
        return rearrange(out, "(b f) (h w) c -> b c f h w", b=b, h=h)


class Block(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.conv, self.norm = (
            nn.Conv3d(dim_in, dim_out, (1, 3, 3), padding=(0, 1, 1)),
            nn.GroupNorm(groups, dim_out),
        )

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.norm(self.conv(x))
        if scale_shift is not None:
            x = x * (scale_shift[0] + 1) + scale_shift[1]
        return F.silu(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, cond_dim: int, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim_out))
        self.block1, self.block2 = Block(dim_in, dim_out, groups), Block(dim_out, dim_out, groups)
        self.skip = nn.Conv3d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale_shift = rearrange(self.mlp(cond), "b (two c) -> two b c 1 1 1", two=2)
        return self.block2(self.block1(x, tuple(scale_shift))) + self.skip(x)


class ReferenceUnet3D(nn.Module):
    """Same call as :class:`lfdm.models.unet3d.Unet3D`: ``(x, t, cond, text_emb) → ε``."""

    def __init__(
        self, cfg: UNetConfig, *, channels: int = 3, cond_channels: int, text_dim: int, **_: object
    ) -> None:
        super().__init__()
        dim, heads, dim_head, groups = cfg.dim, cfg.attn_heads, cfg.attn_dim_head, cfg.resnet_groups
        dims = [dim * m for m in cfg.dim_mults]
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dim), nn.Linear(2 * (dim // 2), 4 * dim), nn.GELU(), nn.Linear(4 * dim, 4 * dim)
        )
        cond_dim = 4 * dim + text_dim
        self.rel_pos = RelativePositionBias(
            heads=heads, num_buckets=cfg.rel_pos_buckets, max_distance=cfg.rel_pos_max_distance
        )
        self.init_conv = nn.Conv3d(channels + cond_channels, dim, (1, 7, 7), padding=(0, 3, 3))
        self.init_temporal = Temporal(dim, heads, dim_head, rotary=True)

        def level(d_in: int, d: int) -> nn.ModuleList:
            return nn.ModuleList(
                [
                    ResnetBlock(d_in, d, cond_dim, groups),
                    ResnetBlock(d, d, cond_dim, groups),
                    SpatialLinearAttention(d, heads, dim_head),
                    Temporal(d, heads, dim_head, rotary=True),
                ]
            )

        self.downs = nn.ModuleList(level(a, b) for a, b in zip([dim, *dims[:-1]], dims, strict=True))
        self.downsamples = nn.ModuleList(
            [*(nn.Conv3d(d, d, (1, 4, 4), (1, 2, 2), (0, 1, 1)) for d in dims[:-1]), nn.Identity()]
        )
        mid = dims[-1]
        self.mid = nn.ModuleList(
            [
                ResnetBlock(mid, mid, cond_dim, groups),
                MidSpatial(mid, heads, dim_head, rotary=False),
                Temporal(mid, heads, dim_head, rotary=True),
                ResnetBlock(mid, mid, cond_dim, groups),
            ]
        )
        self.ups = nn.ModuleList(level(2 * d, d) for d in dims[::-1])
        self.upsamples = nn.ModuleList(
            [
                *(
                    nn.ConvTranspose3d(dims[i], dims[i - 1], (1, 4, 4), (1, 2, 2), (0, 1, 1))
                    for i in range(len(dims) - 1, 0, -1)
                ),
                nn.Identity(),
            ]
        )
        self.final_block = ResnetBlock(dims[0] + dim, dim, cond_dim, groups)
        self.final_conv = nn.Conv3d(dim, channels, 1)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, text_emb: Tensor) -> Tensor:
        f = x.shape[2]
        emb = torch.cat((self.time_mlp(t), text_emb), dim=-1)
        bias = self.rel_pos(f, x.device)
        x = self.init_conv(torch.cat((x, cond[:, :, None].expand(-1, -1, f, -1, -1)), dim=1))
        x = self.init_temporal(x, bias)
        r, skips = x, []
        for (block1, block2, spatial, temporal), down in zip(self.downs, self.downsamples, strict=True):
            x = temporal(spatial(block2(block1(x, emb), emb)), bias)
            skips.append(x)
            x = down(x)
        block1, spatial, temporal, block2 = self.mid
        x = block2(temporal(spatial(block1(x, emb)), bias), emb)
        for (block1, block2, spatial, temporal), up in zip(self.ups, self.upsamples, strict=True):
            x = torch.cat((x, skips.pop()), dim=1)
            x = up(temporal(spatial(block2(block1(x, emb), emb)), bias))
        return self.final_conv(self.final_block(torch.cat((x, r), dim=1), emb))
