"""The classical flow teacher in the LFAE's convention: checked against known motions of a real photo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from lfdm.models.warp import identity_grid, warp
from lfdm.teacher import consistent, pixel_flow, teacher_flows, to_latent_grid

SIZE, LATENT = 64, 16
PIXEL = 2 / (SIZE - 1)  # one frame pixel in grid units


def affine(shift=(0.0, 0.0), zoom=1.0, degrees=0.0) -> torch.Tensor:
    """``(1, 2, 3)``: the backward map of a frame shifted by ``shift`` (grid units), zoomed in by ``zoom``
    and turned by ``degrees``."""
    c, s = math.cos(math.radians(degrees)) / zoom, math.sin(math.radians(degrees)) / zoom
    return torch.tensor([[[c, -s, shift[0]], [s, c, shift[1]]]], dtype=torch.float32)


def render(theta: torch.Tensor) -> np.ndarray:
    """The astronaut photo's middle, seen through the affine map ``theta`` (a frame of ``SIZE``² uint8)."""
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    photo = F.interpolate(photo, size=(3 * SIZE // 2,) * 2, mode="area")
    grid = F.affine_grid(theta, [1, 3, SIZE, SIZE], align_corners=True) * (2 / 3)  # the middle two thirds
    frame = F.grid_sample(photo, grid, align_corners=True)
    return (frame[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    "motion",
    [affine(shift=(0.08, -0.05)), affine(zoom=1.15), affine(degrees=8.0)],
    ids=["shift", "zoom", "rotate"],
)
def test_teacher_grid_equals_the_analytic_one_both_ways(motion):
    """x_i is x_0 seen through a known affine map, so the backward grid from x_i to x_0 is that map's grid and
    the one from x_0 to x_i its inverse's: the converted teacher grid matches both within 0.4 frame pixels on
    average away from the border (DIS medium on 4× frames; the largest motion here is 5 px)."""
    x0, xi = render(affine()), render(motion)
    inverse = torch.linalg.inv(torch.cat((motion[0], torch.tensor([[0.0, 0.0, 1.0]]))))[:2][None]
    backward, forward = teacher_flows(x0[None], xi[None], LATENT, "dis_medium", scale=4)
    for flow, truth in ((backward, motion), (forward, inverse)):
        expected = F.affine_grid(truth, [1, 1, LATENT, LATENT], align_corners=True)
        error = (flow.grid - expected).norm(dim=-1)[0, 2:-2, 2:-2]
        assert error.mean() < 0.4 * PIXEL, error.mean() / PIXEL
        assert flow.reliable[0, 0, 2:-2, 2:-2].mean() > 0.9


def test_the_teacher_grid_warps_the_source_into_the_driving_frame():
    source, driving = render(affine()), render(affine(shift=(0.1, 0.04), degrees=4.0))
    grid = teacher_flows(source[None], driving[None], LATENT, "dis_medium", scale=4)[0].grid
    as_tensor = [torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 for x in (source, driving)]
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    warped = (warp(as_tensor[0], grid) - as_tensor[1])[inner].abs().mean()
    static = (as_tensor[0] - as_tensor[1])[inner].abs().mean()
    assert warped < 0.25 * static


def test_an_affine_displacement_field_becomes_its_exact_latent_grid():
    theta = affine(shift=(0.05, -0.03), zoom=1.15, degrees=8.0)
    field = F.affine_grid(theta, [1, 1, SIZE, SIZE], align_corners=True)
    pixels = (field - identity_grid(SIZE, SIZE)) / PIXEL
    torch.testing.assert_close(
        to_latent_grid(pixels, LATENT),
        F.affine_grid(theta, [1, 1, LATENT, LATENT], align_corners=True),
        atol=1e-5,
        rtol=0,
    )


def test_the_forward_backward_check_flags_what_does_not_come_back():
    torch.manual_seed(0)
    forward = torch.full((1, 8, 8, 2), 2.0)  # every source pixel moves 2 px right and down
    assert consistent(-forward, forward).all()  # the backward flow undoes it
    assert not consistent(torch.zeros_like(forward), forward).any()  # a backward flow of 0 does not


def test_a_still_pair_has_no_motion_and_a_larger_scale_keeps_pixel_units():
    frame = render(affine())
    assert np.abs(pixel_flow(frame, frame, "dis_medium")).max() < 0.05
    shifted = render(affine(shift=(4 * PIXEL, 0.0)))  # the picture moves 4 px left
    for scale in (1, 2, 4):
        dx = pixel_flow(frame, shifted, "dis_medium", scale)[16:-16, 16:-16, 0]
        assert abs(np.median(dx) - 4.0) < 0.3, scale
