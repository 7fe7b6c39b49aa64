"""Frame sampling, the Zarr frame store written by ``preprocess``, and the LFAE's frame-pair dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from lfdm.data.manifest import ManifestRow
from lfdm.errors import MissingInput

FrameSampling = Literal["uniform", "random_sorted", "very_random"]
Mode = Literal["r", "r+", "a", "w", "w-"]  # zarr.open_group's
# training sets up to this size (as stored) are read into memory once: a sample's read from Zarr costs 3–5 ms on
# the training process (its event-loop thread competes with torch's), 5–10 % of a default CPU training step;
# larger sets stream from the store
PRELOAD_MAX_BYTES = 512 << 20


def sample_frame_indices(
    num_available: int, k: int, mode: FrameSampling, rng: np.random.Generator
) -> np.ndarray:
    """``(k,)`` sorted int64 frame indices into a clip of ``num_available`` frames; the first is 0.

    - ``uniform``: evenly spaced, first and last frame included.
    - ``random_sorted`` (after the paper's "randomly sample K frames and sort them"): the uniform indices,
      each interior one redrawn inside the half-gaps to its neighbours, so they stay strictly increasing;
      first 0, last ``num_available - 1``. (The official ``random`` draws within whole gaps, and redraws
      at every load; here they are drawn once in preprocess: docs/model.md, departures.)
    - ``very_random``: ``k`` sorted draws with replacement, the first forced to 0.

    A clip shorter than ``k`` (uniform, random_sorted) gives all its frames, then repeats the last one,
    as the official loaders do; very_random needs no padding (it draws with replacement).
    """
    if k < 2 or num_available < 1:
        raise ValueError(f"need k >= 2 and num_available >= 1, got k={k}, num_available={num_available}")
    if mode == "very_random":
        idx = np.sort(rng.integers(0, num_available, size=k))
        idx[0] = 0
        return idx
    if mode not in ("uniform", "random_sorted"):
        raise ValueError(
            f"unknown frame sampling mode {mode!r}; expected uniform, random_sorted or very_random"
        )
    if num_available < k:
        return np.minimum(np.arange(k), num_available - 1)
    idx = np.rint(np.linspace(0, num_available - 1, k)).astype(np.int64)  # strictly increasing: step >= 1
    if mode == "random_sorted":
        # index i moves within (floor(mid(i-1, i)), floor(mid(i, i+1))]: disjoint, ordered ranges
        mids = np.floor((idx[:-1] + idx[1:]) / 2).astype(np.int64)
        idx[1:-1] = rng.integers(mids[:-1] + 1, mids[1:] + 1)
    return idx


# the official DM loaders' clip-wide colour jitter: brightness, contrast and saturation factors drawn in
# [1 − s, 1 + s], a hue shift in [−s, s] (of a full turn), applied in a random order as torchvision's ColorJitter
COLOUR_JITTER = {"brightness": 64 / 255, "contrast": 0.25, "saturation": 0.25, "hue": 0.04}


def jitter_colours(clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``clip (K, 3, H, W)`` float in [0, 1] with one random change of :data:`COLOUR_JITTER` applied to all its
    frames (each frame's contrast around its own mean, as torchvision does); parameters drawn from ``rng``."""
    # imported here: torchvision's import takes 2–3 s (it loads torch._dynamo), paid by every stage process
    # that imports lfdm.data, and only jittering needs it
    import torchvision.transforms.v2.functional as TF

    for name in rng.permutation(list(COLOUR_JITTER)):
        amount = rng.uniform(-COLOUR_JITTER[name], COLOUR_JITTER[name])
        clip = getattr(TF, f"adjust_{name}")(clip, amount if name == "hue" else 1 + amount)
    return clip


def check_video_id(video_id: str) -> str:
    """``video_id`` if it can name a Zarr v3 node (non-empty, no ``/``, not ``.``/``..``, no ``__`` prefix)."""
    if not video_id or "/" in video_id or video_id in (".", "..") or video_id.startswith("__"):
        raise ValueError(
            f"video id {video_id!r} cannot name a Zarr array (empty, '/', '.', '..' or '__' prefix)"
        )
    return video_id


class LazyZarrGroup:
    """A Zarr v3 group opened on first use in each process.

    DataLoader workers (forked or spawned) each open their own handle rather than use the parent's,
    which matters for remote fsspec stores; pickling drops the handle. A store created with mode
    ``w``/``w-`` is created at once and re-opens as ``r+``, so a worker's copy never wipes it. Arrays
    are opened once per process too (:meth:`array`): opening one reads its metadata, which was 60 % of
    the time of a training sample's read.
    """

    kind = "Zarr store"  # how error messages name the store

    def __init__(self, path: str | Path, mode: Mode = "r") -> None:
        self.path = str(path)
        self.mode: Mode = mode
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._pid = os.getpid()
        if mode in ("w", "w-"):
            self._group = zarr.open_group(self.path, mode=mode)
            self.mode = "r+"

    @property
    def group(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            try:
                self._group = zarr.open_group(self.path, mode=self.mode)
            except FileNotFoundError:
                raise MissingInput(f"no Zarr store at {self.path}") from None
            self._arrays, self._pid = {}, os.getpid()
        return self._group

    def array(self, path: str, video_id: str) -> zarr.Array:
        """The array at ``path`` in the group, which belongs to video ``video_id``; opened once per process."""
        group = self.group
        if path not in self._arrays:
            try:
                node = group[path]
            except KeyError:
                raise KeyError(f"video {video_id!r} is not in {self.kind} {self.path}") from None
            if not isinstance(node, zarr.Array):
                raise ValueError(f"{self.path}: {path} is a group, not an array; is it a {self.kind}?")
            self._arrays[path] = node
        return self._arrays[path]

    def read_array(self, path: str, video_id: str) -> np.ndarray:
        """The whole of :meth:`array` ``path``, read."""
        return np.asarray(self.array(path, video_id)[...])

    def subgroup(self, name: str) -> zarr.Group:
        """The group ``name`` of the store (``flows``, ``z0``, …)."""
        node = self.group[name]
        if not isinstance(node, zarr.Group):
            raise ValueError(f"{self.path}: {name} is an array, not a group; is it a {self.kind}?")
        return node

    def forget(self, path: str) -> None:
        """Drop the open handle of the array at ``path``, which is being rewritten."""
        self._arrays.pop(path, None)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None, "_arrays": {}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, mode={self.mode!r})"


class FrameStore(LazyZarrGroup):
    """Preprocessed frames: one uint8 array ``<video_id>`` of shape ``(T, H, W, 3)`` per clip.

    Chunked per frame, sharded per clip: readers fetch single frames (a pair for the LFAE, K for
    extract_flow) while the store holds one file per clip, which keeps DVC hashing and copies fast.
    """

    kind = "frame store"

    def write(self, video_id: str, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(
                f"{video_id}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        self.forget(video_id)
        arr = self.group.create_array(
            check_video_id(video_id),
            shape=frames.shape,
            dtype=np.uint8,
            chunks=(1, *frames.shape[1:]),
            shards=frames.shape,
            overwrite=True,
        )
        arr[...] = frames

    def read(self, video_id: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``(T, H, W, 3)`` uint8, or ``(len(indices), H, W, 3)``; indices may repeat."""
        if indices is None:
            return self.read_array(video_id, video_id)
        # each frame chunk read once
        unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        return np.asarray(self.array(video_id, video_id).oindex[unique])[inverse]

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and video_id in self.group

    @property
    def video_ids(self) -> list[str]:
        return sorted(self.group.array_keys())


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``(..., H, W, 3)`` uint8 → ``(..., 3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float().div_(255)


class FramePairDataset(Dataset):
    """LFAE training samples: two frames of one clip, drawn with replacement and sorted by time (so
    possibly equal), as the official loader does.

    Item: ``{"source": (3, H, W), "driving": (3, H, W)}`` float32 in [0, 1], plus ``"video_id"``.
    ``repeats`` lists every clip that many times per epoch. Draws are a pure function of
    ``(seed, epoch, index)``, so they do not depend on the number of workers; call :meth:`set_epoch`
    each epoch (as with ``DistributedSampler``) for fresh pairs. ``flip``: a random horizontal flip,
    the same for both frames. Clips are held in memory (``preloaded``) when they fit in ``PRELOAD_MAX_BYTES``;
    otherwise they are read from the store, once per DataLoader worker.
    """

    def __init__(
        self,
        store: FrameStore,
        rows: Sequence[ManifestRow],
        repeats: int = 1,
        seed: int = 0,
        flip: bool = False,
    ) -> None:
        if not rows or repeats < 1:
            raise ValueError(
                f"need at least one clip and repeats >= 1, got {len(rows)} clips, repeats={repeats}"
            )
        self.store, self.rows, self.repeats, self.seed, self.flip = store, list(rows), repeats, seed, flip
        self.epoch = 0
        stored_bytes = sum(store.array(r.video_id, r.video_id).nbytes for r in self.rows)
        self.preloaded = (
            {r.video_id: store.read(r.video_id) for r in self.rows}
            if stored_bytes <= PRELOAD_MAX_BYTES
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):  # also ends plain iteration over the dataset
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        row = self.rows[index % len(self.rows)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        indices = np.sort(rng.integers(0, row.num_frames, size=2))
        if self.preloaded is not None:
            pair = to_tensor(self.preloaded[row.video_id][indices])
        else:
            pair = to_tensor(self.store.read(row.video_id, indices))
        if self.flip and rng.random() < 0.5:
            pair = pair.flip(-1)
        return {"source": pair[0], "driving": pair[1], "video_id": row.video_id}
