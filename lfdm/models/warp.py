"""Latent flow conventions shared by the LFAE, the diffusion model, generation and pictures.

A flow is an absolute backward sampling grid ``(B, H, W, 2)`` in [-1, 1], last dim (x, y), as the
official code uses it: ``warp(z, grid)[..., i, j] = z`` sampled at ``grid[i, j]``. The identity grid has
-1 and +1 at the centres of the corner pixels, so ``align_corners=True`` makes the identity warp exact
(the official code mixes this grid with ``align_corners=False``, a half-pixel shift).

The diffusion model sees a sequence as one ``(B, 3, K, H, W)`` tensor: grid x, grid y, and the
occlusion map rescaled from [0, 1] to [-1, 1]; all three live in about [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """``(H, W, 2)`` grid of pixel-centre coordinates in [-1, 1], (x, y) order."""
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)


def warp(x: torch.Tensor, grid: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Backward-warp ``x (B, C, H, W)`` with ``grid (B, h, w, 2)``, resizing the grid to ``x`` if needed.
    Places outside ``x`` read zeros (the LFAE, as the official code), or the nearest edge (``"border"``).

    Runs in fp32 whatever the autocast: a bf16 grid is off by up to 0.0026 grid units (a third of a pixel at
    256²); the result has ``x``'s dtype."""
    with torch.autocast(x.device.type, enabled=False):
        grid = grid.float()
        if grid.shape[1:3] != x.shape[2:]:
            grid = F.interpolate(
                grid.permute(0, 3, 1, 2), size=x.shape[2:], mode="bilinear", align_corners=True
            )
            grid = grid.permute(0, 2, 3, 1)
        warped = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=padding, align_corners=True)
    return warped.to(x.dtype)


def to_diffusion_tensor(grid: torch.Tensor, occlusion: torch.Tensor) -> torch.Tensor:
    """``grid (B, K, H, W, 2)`` + ``occlusion (B, K, 1, H, W)`` in [0, 1] → ``(B, 3, K, H, W)``."""
    return torch.cat((grid.permute(0, 4, 1, 2, 3), occlusion.transpose(1, 2) * 2 - 1), dim=1)


def from_diffusion_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_diffusion_tensor`; the occlusion map is clamped to [0, 1]."""
    grid = x[:, :2].permute(0, 2, 3, 4, 1)
    occlusion = ((x[:, 2:3] + 1) / 2).clamp(0, 1).transpose(1, 2)
    return grid, occlusion
