from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from lfdm.models.warp import warp

_spec = importlib.util.spec_from_file_location(
    "pretrain_lfae", Path(__file__).parents[2] / "scripts/pretrain_lfae.py"
)
pretrain_lfae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain_lfae)


@pytest.mark.parametrize("flags", list(itertools.product((False, True), repeat=3)))
def test_a_symmetry_maps_the_flow_with_the_frames(flags):
    # warping the transformed source with the transformed grid = transforming the warped source
    torch.manual_seed(0)
    source = torch.rand(3, 12, 12)
    flow = torch.rand(6, 6, 2) * 2 - 1
    warped = warp(source[None], flow[None])[0]
    source_t, flow_t = pretrain_lfae.symmetry(source, flow, *flags)
    expected, _ = pretrain_lfae.symmetry(warped, torch.zeros(6, 6, 2), *flags)
    torch.testing.assert_close(warp(source_t[None], flow_t[None])[0], expected)
    if not any(flags):
        torch.testing.assert_close(flow_t, flow)
