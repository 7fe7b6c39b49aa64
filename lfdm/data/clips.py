"""Loading real clips: one streaming pass over a video file or frame folder → cropped, square clips.

Every dataset reader lists :class:`Source` s (a file and the clips cut from it); :func:`load_source`
turns one into :class:`~lfdm.data.embedded.Clip` s, or :class:`Skip` s for clips it cannot use. It never
holds a whole video: it counts the frames first (demuxing, no decoding), picks at most
``data.max_frames`` evenly spaced frames per clip, and keeps only those while decoding, each shrunk to
a working size as it is converted (:func:`lfdm.video.iter_indexed_frames`). Timestamps are ignored: a
variable-frame-rate video is read as its sequence of frames.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from lfdm.config import DataConfig
from lfdm.data.crop import Cropper, crop_and_resize
from lfdm.data.embedded import Clip
from lfdm.errors import UserError
from lfdm.video import IMAGE_SUFFIXES, count_frames, iter_indexed_frames

MIN_FRAMES = 2  # a clip needs motion: the LFAE learns from two different frames of it
WORK_SIDE = 512  # frames are kept at most this large (or 4 × image_size) until cropped
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
# files no reader may open: opening a FIFO blocks until something writes to it, a device may never end
SPECIAL_FILES = {
    stat.S_ISFIFO: "a named pipe (FIFO)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used as a whole (its directory, its list of clips, no usable clips); the
    message names the file, line or key and what to do. A clip that cannot be used is a :class:`Skip`."""


@dataclass(frozen=True)
class Skip:
    """A clip ``preprocess`` could not use, and why (the reason names the file)."""

    video_id: str
    source: str
    reason: str


@dataclass(frozen=True)
class ClipSpec:
    """What a clip is, before its frames are read. ``start``/``stop``: its frame range in the file
    (``stop`` None: to the end)."""

    video_id: str
    label: str
    subject: str
    split: str
    source: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class Source:
    """A video file or frame folder, the clips cut from it (usually one; NATOPS: 20), their cropper."""

    path: Path
    clips: tuple[ClipSpec, ...]
    crop: Cropper


def even_indices(start: int, stop: int, k: int) -> np.ndarray:
    """At most ``k`` evenly spaced frame indices of ``[start, stop)``, first and last included."""
    n = stop - start
    if n <= k:
        return np.arange(start, stop)
    return start + np.arange(k) * (n - 1) // (k - 1)  # integer steps ≥ 1: strictly increasing


def load_source(src: Source, cfg: DataConfig) -> Iterator[Clip | Skip]:
    """The clips of ``src`` at ``cfg.image_size`` (cropped by ``src.crop``), or a Skip for each that
    cannot be read: missing or corrupt file, fewer than ``MIN_FRAMES`` frames, a frame range past the
    end, frames of different sizes, no crop box; a broken symlink, a FIFO or a device (never opened)."""
    try:
        problem = special_file(src.path)
        total = 0 if problem else count_frames(src.path)
    except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
        problem = _unusable(err)
    if problem:
        yield from (Skip(c.video_id, c.source, problem) for c in src.clips)
        return

    plans: dict[ClipSpec, np.ndarray] = {}
    for clip in src.clips:
        stop = total if clip.stop is None else clip.stop
        if stop > total:
            yield Skip(
                clip.video_id,
                clip.source,
                f"{src.path}: frames {clip.start}..{stop - 1} asked, it has {total}",
            )
        elif stop - clip.start < MIN_FRAMES:
            yield Skip(
                clip.video_id,
                clip.source,
                f"{src.path}: {max(stop - clip.start, 0)} frame(s); a clip needs at least {MIN_FRAMES}",
            )
        else:
            plans[clip] = even_indices(clip.start, stop, cfg.max_frames)
    if not plans:
        return

    owners: dict[int, list[ClipSpec]] = {}
    for clip, indices in plans.items():
        for i in indices.tolist():
            owners.setdefault(i, []).append(clip)
    ends = {clip: int(indices[-1]) for clip, indices in plans.items()}
    kept: dict[ClipSpec, list[np.ndarray]] = {clip: [] for clip in plans}
    try:
        for i, frame in iter_indexed_frames(src.path, owners, max_side=max(WORK_SIDE, 4 * cfg.image_size)):
            for clip in owners[i]:
                kept[clip].append(frame)
                if ends[clip] == i:  # done: crop it now, so one video's many clips are never all held
                    yield _finish(src, clip, kept.pop(clip), total, cfg.image_size)
    except (OSError, ValueError) as err:
        yield from (Skip(c.video_id, c.source, _unusable(err)) for c in kept)
        return
    for clip, frames in kept.items():  # fewer frames decoded than counted
        yield _finish(src, clip, frames, total, cfg.image_size)


def special_file(path: Path) -> str | None:
    """Why the video file or frame folder ``path`` must not be opened, or None: it, or an image in it,
    is a broken symlink, a FIFO, a device or a socket."""
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for file in files:
        try:
            mode = file.stat().st_mode
        except FileNotFoundError:
            if file.is_symlink():
                target = os.readlink(file)
                return f"{file}: a broken symlink (to {target}); point it at the file or leave the clip out"
            continue  # missing: the reader says so
        if what := next((name for test, name in SPECIAL_FILES.items() if test(mode)), None):
            return (
                f"{file}: {what}, not a regular file (reading it would block or never end); "
                "put the file itself there or leave the clip out"
            )
    return None


def _unusable(err: Exception) -> str:
    """A read error as a skip reason, with what to do about it."""
    fix = "check the path" if isinstance(err, FileNotFoundError) else "replace or re-encode it"
    return f"{err}; {fix}, or leave the clip out"


def _finish(src: Source, clip: ClipSpec, frames: list[np.ndarray], total: int, size: int) -> Clip | Skip:
    """The clip from its kept frames, cropped and resized, or why it cannot be used."""
    if len(frames) < MIN_FRAMES:
        return Skip(
            clip.video_id,
            clip.source,
            f"{src.path}: only {len(frames)} of its {total} frames decode; "
            f"a clip needs at least {MIN_FRAMES}",
        )
    shapes = sorted({f.shape for f in frames})
    if len(shapes) > 1:
        return Skip(
            clip.video_id, clip.source, f"{src.path}: frames differ in size: {shapes[0]} and {shapes[-1]}"
        )
    stacked = np.stack(frames)
    try:
        box = src.crop(stacked)
    except ValueError as err:
        return Skip(clip.video_id, clip.source, f"{src.path}: {err}")
    return Clip(
        video_id=clip.video_id,
        label=clip.label,
        subject=clip.subject,
        split=clip.split,
        frames=crop_and_resize(stacked, box, size),
        source=clip.source,
    )


def path_id(rel: PurePath) -> str:
    """A frame-store-safe video id from a path relative to the dataset root: its parts joined by ``-``,
    a video suffix dropped, characters other than letters, digits, ``._-`` replaced by ``_``."""
    parts = list(rel.parts)
    if rel.suffix.lower() in VIDEO_SUFFIXES:
        parts[-1] = rel.stem
    video_id = re.sub(r"[^\w.-]+", "_", "-".join(parts)).lstrip("_.")
    return video_id or "video"


def shuffled(names: Sequence[str], seed: int) -> list[str]:
    """The distinct ``names`` in an order fixed by ``seed`` (independent of their input order)."""
    order = sorted(set(names))
    return [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
