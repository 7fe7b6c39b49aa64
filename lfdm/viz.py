"""Pictures of latent flows, occlusion maps and video grids, for MLflow artefacts and the README.

All functions return ``uint8`` NumPy arrays with channels last, ready for ``write_video`` or
``mlflow.log_image``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lfdm.models.warp import identity_grid


def flow_to_rgb(grid: torch.Tensor) -> np.ndarray:
    """Absolute sampling grid ``(B, H, W, 2)`` or ``(H, W, 2)`` → ``(…, H, W, 3)`` uint8 colour-wheel picture.

    The grid becomes a pixel displacement (grid − identity, scaled by (size − 1) / 2 as in
    ``align_corners=True``), coloured by ``torchvision.utils.flow_to_image``: hue is the direction,
    saturation the magnitude relative to the largest one in each picture, and zero motion is white.
    """
    from torchvision.utils import flow_to_image  # here, as in lfdm.data.frames.jitter_colours: a 2–3 s import

    grid = torch.as_tensor(grid).detach().float()
    single = grid.ndim == 3
    if single:
        grid = grid.unsqueeze(0)
    if grid.ndim != 4 or grid.shape[-1] != 2:
        raise ValueError(f"expected a grid of shape (B, H, W, 2) or (H, W, 2), got {tuple(grid.shape)}")
    h, w = grid.shape[1:3]
    scale = grid.new_tensor([(w - 1) / 2, (h - 1) / 2])
    displacement = (grid - identity_grid(h, w, device=grid.device, dtype=grid.dtype)) * scale
    rgb = flow_to_image(displacement.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1).cpu().numpy()
    return rgb[0] if single else rgb


def occlusion_to_rgb(occlusion: torch.Tensor) -> np.ndarray:
    """Occlusion map ``(…, 1, H, W)`` in [0, 1] → ``(…, H, W, 3)`` uint8 grey (white = visible)."""
    occlusion = torch.as_tensor(occlusion).detach().float()
    if occlusion.ndim < 3 or occlusion.shape[-3] != 1:
        raise ValueError(f"expected an occlusion map of shape (…, 1, H, W), got {tuple(occlusion.shape)}")
    grey = (occlusion.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(np.moveaxis(grey, -3, -1), 3, axis=-1)


def video_grid(
    videos: list[np.ndarray],
    *,
    columns: int | None = None,
    pad: int = 2,
    scale: int = 1,
    pad_value: int = 255,
) -> np.ndarray:
    """Tile videos ``(T_i, H, W, 3)`` uint8 (an ``(H, W, 3)`` image counts as one frame) into one video.

    The result has ``T = max T_i`` frames; shorter videos hold their last frame. Cells are ``scale``×
    nearest-upsampled and separated (and framed) by ``pad`` pixels of ``pad_value``; ``columns`` defaults
    to one row. Returns ``(T, rows·(H·scale + pad) + pad, columns·(W·scale + pad) + pad, 3)``.
    """
    if not videos:
        raise ValueError("video_grid needs at least one video")
    videos = [np.asarray(v)[None] if np.asarray(v).ndim == 3 else np.asarray(v) for v in videos]
    ok = all(v.ndim == 4 and v.shape[-1] == 3 and v.dtype == np.uint8 and len(v) for v in videos)
    if not ok or len({v.shape[1:] for v in videos}) != 1:
        raise ValueError(
            f"expected non-empty uint8 (T, H, W, 3) videos of one size, got {[v.shape for v in videos]}"
        )
    if scale < 1 or pad < 0:
        raise ValueError(f"need scale >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    columns = columns or len(videos)
    rows = math.ceil(len(videos) / columns)
    frames = max(len(v) for v in videos)
    h, w = videos[0].shape[1] * scale, videos[0].shape[2] * scale
    out = np.full((frames, rows * (h + pad) + pad, columns * (w + pad) + pad, 3), pad_value, np.uint8)
    for k, video in enumerate(videos):
        video = np.concatenate([video, np.repeat(video[-1:], frames - len(video), axis=0)])
        video = video.repeat(scale, axis=1).repeat(scale, axis=2)
        top, left = pad + (k // columns) * (h + pad), pad + (k % columns) * (w + pad)
        out[:, top : top + h, left : left + w] = video
    return out


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Frames ``(..., 3, H, W)`` in [0, 1] → ``(..., H, W, 3)`` uint8, channels last."""
    return (frames.detach().clamp(0, 1) * 255).round().byte().movedim(-3, -1).cpu().numpy()


def flow_strip(grid: torch.Tensor, scale: int = 4) -> np.ndarray:
    """A clip's flows ``(K, h, w, 2)`` → one picture, the K frames side by side, ``scale``× upsampled."""
    strip = np.concatenate(list(flow_to_rgb(grid.cpu())), axis=1)
    return strip.repeat(scale, axis=0).repeat(scale, axis=1)


def reconstruction_strip(
    source: torch.Tensor, driving: torch.Tensor, prediction: torch.Tensor, flow: torch.Tensor, scale: int = 2
) -> np.ndarray:
    """One row per pair: source | driving | reconstruction | latent flow (upsampled to the frame size).

    ``source``, ``driving``, ``prediction``: ``(B, 3, H, W)`` in [0, 1]; ``flow``: ``(B, h, w, 2)``.
    """
    frames = [to_uint8(t) for t in (source, driving, prediction)]
    size = source.shape[-1] // flow.shape[1]
    colours = flow_to_rgb(flow.cpu()).repeat(size, axis=1).repeat(size, axis=2)
    cells = [cell for row in zip(*frames, colours, strict=True) for cell in row]
    return video_grid(cells, columns=4, scale=scale)[0]
