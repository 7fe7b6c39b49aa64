from __future__ import annotations

import numpy as np
import pytest
import torch

from lfdm.models.warp import identity_grid
from lfdm.viz import flow_to_rgb, occlusion_to_rgb, video_grid


def shifted_grid(h: int, w: int, pixels: float) -> torch.Tensor:
    """Grid that samples ``pixels`` to the right of every output pixel."""
    grid = identity_grid(h, w).clone()
    grid[..., 0] += pixels * 2 / (w - 1)
    return grid


def test_identity_grid_is_white() -> None:
    rgb = flow_to_rgb(identity_grid(6, 9))
    assert rgb.shape == (6, 9, 3) and rgb.dtype == np.uint8
    assert (rgb == 255).all()


def test_uniform_shift_colours_uniformly_and_by_direction() -> None:
    right, left = flow_to_rgb(torch.stack([shifted_grid(5, 7, 1.5), shifted_grid(5, 7, -1.5)]))
    for rgb in (right, left):
        assert (rgb == rgb[0, 0]).all()  # one colour everywhere
        assert not (rgb == 255).all()  # and not the zero-motion white
    assert not np.array_equal(right[0, 0], left[0, 0])


def test_flow_is_measured_in_pixels_per_axis() -> None:
    # One pixel along x (left half) and one pixel along y (right half) of a wide picture have the same
    # norm, so flow_to_image's per-picture normalisation saturates both equally.
    h, w = 5, 11
    grid = identity_grid(h, w)
    grid[:, :5, 0] += 2 / (w - 1)
    grid[:, 5:, 1] += 2 / (h - 1)
    rgb = flow_to_rgb(grid).astype(int)
    saturation = rgb.max(-1) - rgb.min(-1)
    assert saturation.min() > 200 and saturation.max() - saturation.min() <= 2
    assert not np.array_equal(rgb[0, 0], rgb[0, -1])


def test_batched_shapes() -> None:
    grids = identity_grid(4, 6).expand(3, 4, 6, 2)
    assert flow_to_rgb(grids).shape == (3, 4, 6, 3)
    occ = torch.rand(2, 5, 1, 4, 6)
    rgb = occlusion_to_rgb(occ)
    assert rgb.shape == (2, 5, 4, 6, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], (occ[:, :, 0] * 255).round().to(torch.uint8).numpy())
    with pytest.raises(ValueError):
        flow_to_rgb(torch.zeros(4, 6, 3))


def test_video_grid_tiles_and_holds_last_frame() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (3, 4, 5, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (1, 4, 5, 3), dtype=np.uint8)
    c = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)  # an image
    grid = video_grid([a, b, c], columns=2, pad=1)
    assert grid.shape == (3, 2 * (4 + 1) + 1, 2 * (5 + 1) + 1, 3)
    np.testing.assert_array_equal(grid[:, 1:5, 1:6], a)
    np.testing.assert_array_equal(grid[:, 1:5, 7:12], np.repeat(b, 3, axis=0))
    np.testing.assert_array_equal(grid[2, 6:10, 1:6], c)
    assert (grid[:, 0] == 255).all() and (grid[:, :, 6] == 255).all()  # border and gutter
    assert (grid[:, 6:10, 7:12] == 255).all()  # the empty fourth cell


def test_video_grid_scale_is_nearest() -> None:
    v = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    grid = video_grid([v], pad=0, scale=3)
    assert grid.shape == (2, 6, 9, 3)
    np.testing.assert_array_equal(grid[:, ::3, ::3], v)
    np.testing.assert_array_equal(grid[:, 2::3, 2::3], v)
    with pytest.raises(ValueError):
        video_grid([v, v[:, :1]])
