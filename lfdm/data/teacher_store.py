"""The teacher flows ``pretrain_flow`` distils into F: a classical method's flows for frame pairs of the
training clips, kept in Zarr so that retuning the distillation does not recompute them.

Layout: ``flows/<video_id>`` ``(P, 6, h, w)`` float16 — for each pair, the backward grid from the driving
frame to the source (x, y) and its reliability, then the forward grid (source → driving) and its
reliability (:class:`lfdm.teacher.TeacherFlow`); ``pairs/<video_id>`` ``(P, 2)`` int32 — the (source,
driving) frame indices, source first in time. Each clip's flow array records the digest of the frames it
was computed from, and the group the :class:`TeacherSettings`: :meth:`TeacherFlowStore.update` recomputes
only clips that are new or whose frames changed, and everything when the settings did.
"""

from __future__ import annotations

import hashlib
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from lfdm.data.frames import PRELOAD_MAX_BYTES, FrameStore, LazyZarrGroup, check_video_id, to_tensor
from lfdm.data.manifest import ManifestRow
from lfdm.teacher import TeacherName, teacher_flows

STATIC_MOTION = 0.1  # frame pixels: a clip whose teacher flows all stay below this is reported as not moving


@dataclass(frozen=True)
class TeacherSettings:
    method: TeacherName
    scale: int
    pairs_per_clip: int
    latent_size: int
    seed: int


class StaticClipWarning(UserWarning):
    """A training clip whose frames do not move: it only teaches F that nothing moves."""


class TeacherFlowStore(LazyZarrGroup):
    kind = "teacher flow store"

    def update(
        self, frames: FrameStore, rows: Sequence[ManifestRow], settings: TeacherSettings
    ) -> dict[str, float]:
        """Make the store hold the teacher flows of ``rows`` under ``settings``; returns counts."""
        group = self.group
        if group.attrs.get("settings") != asdict(settings):
            for name in ("flows", "pairs"):
                group.create_group(name, overwrite=True)
            self._arrays.clear()
            group.attrs["settings"] = asdict(settings)
        computed = static = 0
        for row in tqdm(rows, desc=f"teacher flows ({settings.method} ×{settings.scale})", unit="clip"):
            check_video_id(row.video_id)
            clip = frames.read(row.video_id)
            digest = hashlib.sha1(clip.tobytes()).hexdigest()
            stored = self.subgroup("flows")
            if row.video_id in stored and stored[row.video_id].attrs.get("frames_sha1") == digest:
                continue
            pairs = frame_pairs(len(clip), settings.pairs_per_clip, settings.seed, row.video_id)
            source, driving = clip[pairs[:, 0]], clip[pairs[:, 1]]
            backward, forward = teacher_flows(
                source, driving, settings.latent_size, settings.method, settings.scale
            )
            if max(backward.max_motion, forward.max_motion) < STATIC_MOTION:
                static += 1
                warnings.warn(
                    f"{row.video_id}: the teacher sees no motion in any of its {len(pairs)} frame pairs "
                    f"(under {STATIC_MOTION} px); it is kept, but only teaches F that nothing moves",
                    StaticClipWarning,
                    stacklevel=2,
                )
            flows = torch.cat((backward.stacked(), forward.stacked()), dim=1).numpy().astype(np.float16)
            self._write("pairs", row.video_id, pairs.astype(np.int32))
            self._write("flows", row.video_id, flows).attrs["frames_sha1"] = digest
            computed += 1
        return {
            "teacher_clips_computed": computed,
            "teacher_clips_reused": len(rows) - computed,
            "teacher_static_clips": static,
        }

    def _write(self, name: str, video_id: str, x: np.ndarray):
        self.forget(f"{name}/{video_id}")
        arr = self.subgroup(name).create_array(
            video_id, shape=x.shape, dtype=x.dtype, chunks=x.shape, overwrite=True
        )
        arr[...] = x
        return arr

    def read(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(pairs (P, 2) int32, flows (P, 6, h, w) float16)`` of one clip."""
        return self.read_array(f"pairs/{video_id}", video_id), self.read_array(f"flows/{video_id}", video_id)


def frame_pairs(num_frames: int, count: int, seed: int, video_id: str) -> np.ndarray:
    """``(min(count, n(n−1)/2), 2)`` distinct (source, driving) index pairs of a clip, source < driving,
    drawn without replacement from ``(seed, video_id)``: the same pairs whatever the order of the clips."""
    if num_frames < 2:
        raise ValueError(f"{video_id}: {num_frames} frame(s); a teacher flow needs a pair of frames")
    source, driving = np.triu_indices(num_frames, k=1)
    rng = np.random.default_rng([seed, zlib.crc32(video_id.encode())])
    chosen = np.sort(rng.choice(len(source), size=min(count, len(source)), replace=False))
    return np.stack((source[chosen], driving[chosen]), axis=1)


def symmetry(
    frames: torch.Tensor,
    maps: torch.Tensor,
    grid: torch.Tensor,
    mirror_x: bool,
    mirror_y: bool,
    transpose: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``frames (..., H, W)``, per-pixel ``maps (..., h, w)`` and their backward grid ``grid (h, w, 2)`` under
    one symmetry of the square: a mirrored frame's grid is the mirrored grid with that coordinate negated, a
    transposed frame's the transposed grid with x and y swapped."""
    if mirror_x:
        frames, maps, grid = frames.flip(-1), maps.flip(-1), grid.flip(1) * grid.new_tensor([-1.0, 1.0])
    if mirror_y:
        frames, maps, grid = frames.flip(-2), maps.flip(-2), grid.flip(0) * grid.new_tensor([1.0, -1.0])
    if transpose:
        frames, maps, grid = frames.transpose(-1, -2), maps.transpose(-1, -2), grid.transpose(0, 1).flip(-1)
    return frames.contiguous(), maps.contiguous(), grid.contiguous()


class TeacherPairDataset(Dataset):
    """Distillation samples: every stored pair of every clip. Item: ``{"source", "driving": (3, H, W) in
    [0, 1], "grid": (h, w, 2) the teacher's backward grid, "reliable": (1, h, w) in [0, 1]}``.

    ``augment``: each draw plays the pair forwards or backwards in time (the stored forward flow is the
    reversed pair's backward flow) under one of the eight symmetries of the square, at random from
    ``(seed, epoch, index)``; call :meth:`set_epoch` each epoch for fresh draws. Clips, their frames and flows,
    are held in memory when they fit in ``PRELOAD_MAX_BYTES`` (reading a pair from the stores costs as much as
    F's forward pass on it); otherwise they are read from the stores, once per DataLoader worker.
    """

    def __init__(
        self,
        frames: FrameStore,
        teacher: TeacherFlowStore,
        video_ids: Sequence[str],
        *,
        seed: int,
        augment: bool,
    ) -> None:
        self.frames, self.teacher, self.seed, self.augment, self.epoch = frames, teacher, seed, augment, 0
        pairs = {v: teacher.read(v)[0] for v in video_ids}
        self.items = [(v, j) for v in video_ids for j in range(len(pairs[v]))]
        if not self.items:
            raise ValueError("no teacher flows to distil: no training clip has a pair of frames")
        sizes = [frames.array(v, v).nbytes + teacher.array(f"flows/{v}", v).nbytes for v in video_ids]
        self.preloaded = (
            {v: (frames.read(v), *teacher.read(v)) for v in video_ids}
            if sum(sizes) <= PRELOAD_MAX_BYTES
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video_id, j = self.items[index]
        if self.preloaded is not None:
            clip, pairs, flows = self.preloaded[video_id]
        else:
            clip, (pairs, flows) = None, self.teacher.read(video_id)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        reverse, *flips = rng.integers(0, 2, size=4).astype(bool) if self.augment else (False,) * 4
        (source, driving), flow = pairs[j], torch.from_numpy(flows[j].astype(np.float32))
        if reverse:
            source, driving, flow = driving, source, flow[3:]
        pair = to_tensor(
            clip[[source, driving]] if clip is not None else self.frames.read(video_id, [source, driving])
        )
        pair, reliable, grid = symmetry(pair, flow[2:3], flow[:2].permute(1, 2, 0), *flips)
        return {"source": pair[0], "driving": pair[1], "grid": grid, "reliable": reliable}
