"""Conditional 3D U-Net ε_θ(s_t, t, z0, e) of stage two (paper Sec. 3.2.2 and 4.2; VDM, lucidrains).

Every convolution has a (1, k, k) kernel and every normalisation is per frame (or, with ``norm: clip``,
over the clip), so frames meet only in the temporal attention layers (and those norms). The network
therefore keeps frames folded into the batch, ``(B·K, C, H, W)``, and runs 2D convolutions (a Conv3d with a
(1, k, k) kernel computes exactly this); it unfolds frames only inside temporal attention and a clip's
norm. With ``temporal_attn`` off and per-frame norms it is an image model applied to each frame
independently.

Conditioning: the first frame's latent z0 is concatenated with the noisy input on channels; the
timestep embedding is concatenated with the text embedding e (or the null embedding ∅ on rows where
``drop_text`` is set, for null-condition dropout and classifier-free guidance) and modulates every
ResnetBlock through FiLM. With ``frame_embedding`` each frame also adds an embedding of its index k to
the time part, so every layer knows which frame it works on (frame 0 is x0 itself: identity flow).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from lfdm.config import UNetConfig


class SinusoidalPosEmb(nn.Module):
    """Timesteps ``(B,)`` → ``(B, 2·(dim // 2))`` sin/cos features (Vaswani et al.)."""

    freqs: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * self.freqs
        return torch.cat((args.sin(), args.cos()), dim=-1)


def relative_position_bucket(rel: Tensor, *, num_buckets: int, max_distance: int) -> Tensor:
    """T5 buckets for offsets ``rel`` (key − query): half the buckets per direction, exact offsets
    below a quarter of ``num_buckets``, log-spaced up to ``max_distance``, the last bucket beyond."""
    half = num_buckets // 2
    exact = max(half // 2, 1)
    n = rel.abs()
    log_ratio = torch.log(n.clamp(min=1).float() / exact) / math.log(max(max_distance / exact, 1 + 1e-6))
    far = (exact + log_ratio * (half - exact)).long().clamp(max=half - 1)
    bucket = torch.where(n < exact, n, far) + (rel > 0).long() * half
    return bucket.clamp(0, num_buckets - 1)


class RelativePositionBias(nn.Module):
    """Learned T5-style bias ``(heads, K, K)`` on temporal attention logits."""

    def __init__(self, *, heads: int, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, heads)

    def forward(self, frames: int, device: torch.device) -> Tensor:
        pos = torch.arange(frames, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return rearrange(self.embedding(buckets), "i j h -> h i j")


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with a residual; subclasses choose the token axis."""

    # sequences are attended in chunks of at most this many q/k/v values (16 MB in fp32): a whole batch's
    # projection is gigabytes at the paper's shape, and a cache-sized chunk is also faster on a CPU
    # (docs/benchmarks.md: a paper-shape guided step of 10 clips 1.4–1.8× faster at about half the memory)
    chunk_values = 2**22

    def __init__(self, dim: int, *, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def attend(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """Tokens ``(N, L, C)`` → ``(N, L, C)``; ``bias`` ``(heads, L, L)`` is added to the logits."""
        rows = max(1, self.chunk_values // (x.shape[1] * self.to_qkv.out_features))
        if len(x) <= rows:  # no split: autograd would add a node that reorders gradient sums (float rounding)
            return self.attend_chunk(x, bias)
        return torch.cat([self.attend_chunk(chunk, bias) for chunk in x.split(rows)])

    def attend_chunk(self, x: Tensor, bias: Tensor | None) -> Tensor:
        # dense token rows for the norm and projection; q, k, v are views split off the projection's own
        # axis, so backward stacks their gradients straight into its layout (no permuted copy)
        qkv = self.to_qkv(self.norm(x.contiguous())).unflatten(-1, (3, self.heads, -1))
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if q.device.type == "cpu":
            # torch's CPU attention kernels take 3–4× longer forward and backward in bf16 than in fp32 at these
            # lengths (benchmarks/bf16_kernels.py; a train_dm step 6 % faster so): attention stays fp32 there
            q, k, v = q.float(), k.float(), v.float()
        # a 4-D mask: with a 3-D one SDPA's CPU flash kernel falls back to the unfused math path (3.5× slower
        # at the paper's temporal shape); a mask that needs a gradient (training) takes that path either way
        mask = None if bias is None else bias.to(q.dtype)[None]
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast them back to bf16
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.to_out(out.transpose(1, 2).flatten(2))


class SpatialAttention(Attention):
    """Full attention among the H·W positions of each frame: ``(B·K, C, H, W)`` → same shape."""

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.attend(rearrange(x, "n c h w -> n (h w) c"))
        return rearrange(tokens, "n (h w) c -> n c h w", h=x.shape[-2])


class TemporalAttention(Attention):
    """Attention among the K frames at each position: ``(B·K, C, H, W)`` → same shape, with the
    relative position ``bias`` ``(heads, K, K)`` (K is read from it)."""

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        tokens = self.attend(rearrange(x, "(b k) c h w -> (b h w) k c", k=bias.shape[-1]), bias)
        return rearrange(tokens, "(b h w) k c -> (b k) c h w", h=h, w=w)


class GroupNorm(nn.GroupNorm):
    """GroupNorm of ``x (B·K, C, H, W)``: each frame on its own, or with ``clip`` each clip's K frames
    together (the official 3D U-Net's GroupNorm on ``(B, C, K, H, W)``)."""

    def __init__(self, groups: int, channels: int, *, clip: bool) -> None:
        super().__init__(groups, channels)
        self.clip = clip

    def forward(self, x: Tensor, frames: int) -> Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        if not self.clip:
            return super().forward(x)
        clips = rearrange(x, "(b k) c h w -> b c k h w", k=frames)
        return rearrange(super().forward(clips), "b c k h w -> (b k) c h w")


class ResnetBlock(nn.Module):
    """[conv 3×3 → GroupNorm → SiLU] × 2 with a residual; FiLM ``x·(scale+1)+shift`` from the condition
    vector after the first norm. ``x (N, C_in, H, W)`` with N = B·K, ``cond (N, cond_dim)`` →
    ``(N, C_out, H, W)``; ``clip_norm``: :class:`GroupNorm` over each clip."""

    def __init__(self, dim_in: int, dim_out: int, *, cond_dim: int, groups: int, clip_norm: bool) -> None:
        super().__init__()
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim_out))
        self.conv1, self.norm1 = (
            nn.Conv2d(dim_in, dim_out, 3, padding=1),
            GroupNorm(groups, dim_out, clip=clip_norm),
        )
        self.conv2, self.norm2 = (
            nn.Conv2d(dim_out, dim_out, 3, padding=1),
            GroupNorm(groups, dim_out, clip=clip_norm),
        )
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, frames: int) -> Tensor:
        scale, shift = rearrange(self.film(cond), "n (two c) -> two n c 1 1", two=2)
        h = F.silu(self.norm1(self.conv1(x), frames) * (scale + 1) + shift)
        h = F.silu(self.norm2(self.conv2(h), frames))
        return h + self.skip(x)


class Level(nn.Module):
    """One resolution of either path: 2 ResnetBlocks, then optional spatial and temporal attention."""

    def __init__(
        self,
        dim_in: int,
        dim: int,
        *,
        cond_dim: int,
        groups: int,
        clip_norm: bool,
        spatial: bool,
        temporal: bool,
        heads: int,
        dim_head: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                ResnetBlock(dim_in, dim, cond_dim=cond_dim, groups=groups, clip_norm=clip_norm),
                ResnetBlock(dim, dim, cond_dim=cond_dim, groups=groups, clip_norm=clip_norm),
            ]
        )
        self.spatial = SpatialAttention(dim, heads=heads, dim_head=dim_head) if spatial else None
        self.temporal = TemporalAttention(dim, heads=heads, dim_head=dim_head) if temporal else None

    def forward(self, x: Tensor, cond: Tensor, bias: Tensor | None, frames: int) -> Tensor:
        for block in self.blocks:
            x = block(x, cond, frames)
        if self.spatial is not None:
            x = self.spatial(x)
        if self.temporal is not None:
            x = self.temporal(x, bias)
        return x


class Unet3D(nn.Module):
    """ε_θ: noisy latent flow + occlusion ``(B, channels, K, H, W)`` → predicted noise, same shape.

    Level i has ``cfg.dim * cfg.dim_mults[i]`` channels at side ``H / 2**i``. Spatial attention is
    built at the levels whose side *at ``latent_size``* is ≤ ``cfg.spatial_attn_max_size`` (the middle
    block always has it); the network itself runs at any H, W divisible by ``2**(levels - 1)``.
    """

    def __init__(
        self, cfg: UNetConfig, *, channels: int = 3, cond_channels: int, text_dim: int, latent_size: int = 16
    ) -> None:
        super().__init__()
        dim = cfg.dim
        if dim % cfg.resnet_groups:
            raise ValueError(
                f"dm.unet.dim={dim} must be divisible by dm.unet.resnet_groups={cfg.resnet_groups}"
            )
        dims = [dim * m for m in cfg.dim_mults]
        self.factor = 2 ** (len(dims) - 1)

        # time MLP output is concatenated with the text embedding: cond vector 4·dim + text_dim
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dim), nn.Linear(2 * (dim // 2), 4 * dim), nn.GELU(), nn.Linear(4 * dim, 4 * dim)
        )
        cond_dim = 4 * dim + text_dim
        self.frame_mlp = (
            nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(2 * (dim // 2), 4 * dim))
            if cfg.frame_embedding
            else None
        )
        self.null_text = nn.Parameter(torch.randn(text_dim)) if cfg.null_embedding == "learned" else None

        attn = {"heads": cfg.attn_heads, "dim_head": cfg.attn_dim_head}
        temporal = cfg.temporal_attn
        self.rel_pos = (
            RelativePositionBias(
                heads=cfg.attn_heads, num_buckets=cfg.rel_pos_buckets, max_distance=cfg.rel_pos_max_distance
            )
            if temporal
            else None
        )
        self.init_conv = nn.Conv2d(channels + cond_channels, dim, 7, padding=3)
        self.init_temporal = TemporalAttention(dim, **attn) if temporal else None

        block = {"cond_dim": cond_dim, "groups": cfg.resnet_groups, "clip_norm": cfg.norm == "clip"}
        level = partial(Level, **block, temporal=temporal, **attn)
        spatial = [(latent_size >> i) <= cfg.spatial_attn_max_size for i in range(len(dims))]
        self.downs = nn.ModuleList(
            level(d_in, d, spatial=s) for d_in, d, s in zip([dim, *dims[:-1]], dims, spatial, strict=True)
        )
        self.downsamples = nn.ModuleList(
            [*(nn.Conv2d(d, d, 4, stride=2, padding=1) for d in dims[:-1]), nn.Identity()]
        )

        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, **block)
        self.mid_spatial = SpatialAttention(mid, **attn)
        self.mid_temporal = TemporalAttention(mid, **attn) if temporal else None
        self.mid_block2 = ResnetBlock(mid, mid, **block)

        # deepest level first; each up level sees its own output concatenated with the matching skip
        self.ups = nn.ModuleList(
            level(2 * d, d, spatial=s) for d, s in zip(dims[::-1], spatial[::-1], strict=True)
        )
        self.upsamples = nn.ModuleList(
            [
                nn.ConvTranspose2d(dims[i], dims[i - 1], 4, stride=2, padding=1)
                for i in range(len(dims) - 1, 0, -1)
            ]
            + [nn.Identity()]
        )

        self.final_block = ResnetBlock(dims[0] + dim, dim, **block)
        self.final_conv = nn.Conv2d(dim, channels, 1)
        # zero output at initialisation: the first ε-predictions are 0, so training starts at loss ≈ 1
        for param in self.final_conv.parameters():  # weight and bias
            nn.init.zeros_(param)

    def stem(self, x: Tensor, cond: Tensor) -> Tensor:
        """``init_conv`` over every frame concatenated with z0: ``x (B, C, K, H, W)``, ``cond (B, C', H, W)``
        → ``(B·K, dim, H, W)``. The convolution is linear, so its z0 half is computed once per clip and
        added to every frame, not run on K copies of z0 (that was a quarter to a third of the forward's
        FLOPs)."""
        conv, k = self.init_conv, x.shape[2]
        w_x, w_cond = conv.weight.split([x.shape[1], cond.shape[1]], dim=1)
        frames = F.conv2d(rearrange(x, "b c k h w -> (b k) c h w"), w_x, conv.bias, padding=conv.padding)
        shared = F.conv2d(cond, w_cond, padding=conv.padding)
        return (rearrange(frames, "(b k) c h w -> b k c h w", k=k) + shared[:, None]).flatten(0, 1)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor, text_emb: Tensor, drop_text: Tensor | None = None
    ) -> Tensor:
        """``x (B, channels, K, H, W)``, ``t (B,)`` or scalar timesteps, ``cond (B, cond_channels, H, W)``
        (z0, shared by all K frames), ``text_emb (B, text_dim)``, ``drop_text (B,)`` bool: rows that use
        the null embedding instead of ``text_emb``. Returns ``(B, channels, K, H, W)``."""
        b, _, k, h, w = x.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"latent {h}×{w} must be divisible by {self.factor} (2 ** (len(dim_mults) - 1))")

        if drop_text is not None:
            null = self.null_text if self.null_text is not None else text_emb.new_zeros(())
            text_emb = torch.where(drop_text[:, None], null, text_emb)
        time = repeat(self.time_mlp(torch.as_tensor(t, device=x.device).expand(b)), "b d -> b k d", k=k)
        if self.frame_mlp is not None:
            time = time + self.frame_mlp(torch.arange(k, device=x.device))
        emb = torch.cat((time, repeat(text_emb, "b d -> b k d", k=k)), dim=-1).flatten(0, 1)  # (b·k, d)
        # one relative position bias per forward, shared by every temporal attention layer
        bias = self.rel_pos(k, x.device) if self.rel_pos is not None else None

        x = self.stem(x, cond)
        if self.init_temporal is not None:
            x = self.init_temporal(x, bias)
        r = x

        skips = []
        for level, downsample in zip(self.downs, self.downsamples, strict=True):
            x = level(x, emb, bias, k)
            skips.append(x)
            x = downsample(x)

        x = self.mid_spatial(self.mid_block1(x, emb, k))
        if self.mid_temporal is not None:
            x = self.mid_temporal(x, bias)
        x = self.mid_block2(x, emb, k)

        for level, upsample in zip(self.ups, self.upsamples, strict=True):
            x = upsample(level(torch.cat((x, skips.pop()), dim=1), emb, bias, k))

        x = self.final_conv(self.final_block(torch.cat((x, r), dim=1), emb, k))
        return rearrange(x, "(b k) c h w -> b c k h w", k=k)
