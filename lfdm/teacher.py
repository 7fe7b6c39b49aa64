"""A classical optical-flow teacher (OpenCV's DIS or Farneback) in the LFAE's flow convention.

The LFAE's F estimates, for a (source, driving) pair, the backward sampling grid from the driving frame
to the source at the latent size (:mod:`lfdm.models.warp`: ``warp(source, grid) ≈ driving``, grid values in
[-1, 1] with ``align_corners=True``). :func:`teacher_flows` gives the same thing from a classical method,
label-free, for any footage, plus a reliability map from the forward–backward consistency check
(Sundaram et al. 2010): a driving pixel whose backward flow, followed by the forward flow from where it
lands, does not come back near itself is not visible in the source (occluded or appearing) or its flow
is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lfdm.config import TeacherName
from lfdm.models.warp import identity_grid

_DIS_PRESETS = {
    "dis_ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "dis_fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "dis_medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
# forward–backward check: |f_bw(p) + f_fw(p + f_bw(p))|² ≤ α (|f_bw|² + |f_fw|²) + β, in frame pixels
CONSISTENCY_ALPHA = 0.01
CONSISTENCY_BETA = 0.5


@dataclass
class TeacherFlow:
    """The teacher's flows for N frame pairs, one direction: ``grid (N, h, w, 2)`` backward grids at the latent
    size (warp convention); ``reliable (N, 1, h, w)`` in [0, 1], the share of each latent pixel's frame pixels
    that pass the forward–backward check; ``max_motion``: the largest displacement, in frame pixels."""

    grid: torch.Tensor
    reliable: torch.Tensor
    max_motion: float

    def stacked(self) -> torch.Tensor:
        """``(N, 3, h, w)``: grid x, grid y, reliability."""
        return torch.cat((self.grid.permute(0, 3, 1, 2), self.reliable), dim=1)


def pixel_flow(source: np.ndarray, driving: np.ndarray, method: TeacherName, scale: int = 1) -> np.ndarray:
    """``(H, W, 2)`` float32 displacement in frame pixels (x, y): driving pixel p shows what the source holds at
    p + flow(p). Frames are ``(H, W, 3)`` uint8; with ``scale`` > 1 the flow is computed on frames that much
    larger (DIS's patches then cover less of the picture) and brought back to the frame's size."""
    h, w = driving.shape[:2]
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (driving, source)]
    if scale > 1:
        grey = [cv2.resize(g, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC) for g in grey]
    # OpenCV allocates an output array passed as None (the flow); its stubs demand an array
    if method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(grey[0], grey[1], None, 0.5, 4, 9, 5, 5, 1.1, 0)  # pyright: ignore[reportCallIssue, reportArgumentType]
    else:
        dis = cv2.DISOpticalFlow.create(_DIS_PRESETS[method])
        flow = dis.calc(grey[0], grey[1], None)  # pyright: ignore[reportCallIssue, reportArgumentType]
    if scale > 1:
        flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_AREA) / scale
    return flow.astype(np.float32)


def consistent(backward: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` 1 where a driving pixel passes the forward–backward check, else 0. ``backward (N, H, W, 2)``:
    driving → source; ``forward``: source → driving (pixel displacements, :func:`pixel_flow`). A pixel that
    lands outside the source takes the forward flow at the nearest edge."""
    h, w = backward.shape[1:3]
    landing = identity_grid(h, w) + backward * backward.new_tensor([2 / (w - 1), 2 / (h - 1)])
    returned = F.grid_sample(forward.permute(0, 3, 1, 2), landing, align_corners=True, padding_mode="border")
    returned = returned.permute(0, 2, 3, 1)
    error = (backward + returned).square().sum(-1)
    bound = CONSISTENCY_ALPHA * (backward.square().sum(-1) + returned.square().sum(-1)) + CONSISTENCY_BETA
    return (error <= bound).float().unsqueeze(1)


def to_latent_grid(displacement: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Pixel displacements ``(N, H, W, 2)`` → backward grids ``(N, h, w, 2)`` at ``h = w = latent_size``:
    scaled to grid units (``align_corners=True``: the frame spans 2 over W − 1 pixels), low-passed with a
    Gaussian of the downsampling's width, sampled at the latent pixels' places and added to the identity
    grid. The blur pads by odd reflection (2·f(edge) − f(edge − x)), which keeps an affine motion affine up
    to the border, so the grid of an affine motion is exact."""
    h, w = displacement.shape[1:3]
    units = (displacement * displacement.new_tensor([2 / (w - 1), 2 / (h - 1)])).permute(0, 3, 1, 2)
    sigma = (w / latent_size - 1) / 2
    if sigma > 0:
        radius = max(1, round(2 * sigma))
        taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=units.dtype).square() / (2 * sigma**2))
        taps = taps / taps.sum()
        for dim in (-1, -2):
            units = _odd_pad(units, radius, dim)
            kernel = taps.view(1, 1, -1, 1) if dim == -2 else taps.view(1, 1, 1, -1)
            units = F.conv2d(units, kernel.expand(2, 1, *kernel.shape[2:]), groups=2)
    small = F.interpolate(units, size=(latent_size, latent_size), mode="bilinear", align_corners=True)
    return identity_grid(latent_size, latent_size) + small.permute(0, 2, 3, 1)


def _odd_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, x.shape[dim] - 1, 1)
    before = 2 * first - x.narrow(dim, 1, pad).flip(dim)
    after = 2 * last - x.narrow(dim, x.shape[dim] - 1 - pad, pad).flip(dim)
    return torch.cat((before, x, after), dim)


def teacher_flows(
    sources: np.ndarray,
    drivings: np.ndarray,
    latent_size: int,
    method: TeacherName = "dis_medium",
    scale: int = 1,
) -> tuple[TeacherFlow, TeacherFlow]:
    """The teacher's flows for frame pairs ``sources[i], drivings[i]`` (``(N, H, W, 3)`` uint8 each), both ways:
    backward (driving → source, what F predicts for the pair) and forward (source → driving, the reversed
    pair's), each checked against the other."""
    pairs = list(zip(sources, drivings, strict=True))
    backward = torch.from_numpy(np.stack([pixel_flow(s, d, method, scale) for s, d in pairs]))
    forward = torch.from_numpy(np.stack([pixel_flow(d, s, method, scale) for s, d in pairs]))

    def direction(flow: torch.Tensor, reverse: torch.Tensor) -> TeacherFlow:
        reliable = F.interpolate(consistent(flow, reverse), size=(latent_size, latent_size), mode="area")
        return TeacherFlow(to_latent_grid(flow, latent_size), reliable, float(flow.norm(dim=-1).max()))

    return direction(backward, forward), direction(forward, backward)
