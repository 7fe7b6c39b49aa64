"""Crop boxes for clips, and the crop + aspect-preserving resize + pad that makes stored frames square.

A box is ``(x0, y0, x1, y1)`` in fractions of the frame's width and height, so a box found at one
resolution (a depth map, a downscaled frame, an official pixel box) applies to any other. Each clip gets
one box: LFDM learns motion against a still camera, so per-frame boxes are smoothed into a single one
(the median) rather than followed frame by frame, which would add a camera shake of its own.

Croppers take a clip's frames ``(T, H, W, 3)`` uint8 and return its box; they raise ``ValueError`` when a
clip has no usable box (no face found), which ``preprocess`` records as a skipped clip.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import cv2
import cv2.data  # the cascades' folder: a submodule the cv2 stubs do not declare
import numpy as np

Box = tuple[float, float, float, float]
Cropper = Callable[[np.ndarray], Box]
FULL: Box = (0.0, 0.0, 1.0, 1.0)

FACE_DETECT_FRAMES = 8  # frames of a clip the face detector looks at, evenly spaced
FACE_DETECT_MIN_SIDE = 128  # smaller frames are upscaled for the detector (its window is 24 px)
BODY_MARGIN = 0.1  # body boxes grow by this share of their size on every side


def pixel_box(rows: tuple[int, int], cols: tuple[int, int], height: int, width: int) -> Box:
    """The box of ``frame[rows[0]:rows[1], cols[0]:cols[1]]`` for frames of ``height × width`` px."""
    return cols[0] / width, rows[0] / height, cols[1] / width, rows[1] / height


def full_box(frames: np.ndarray) -> Box:
    """The whole frame (resized with padding to keep its aspect ratio)."""
    return FULL


def center_box(frames: np.ndarray) -> Box:
    """The largest centred square."""
    h, w = frames.shape[1:3]
    return square_box(w / 2, h / 2, min(h, w), h, w)


def square_box(cx: float, cy: float, side: float, height: int, width: int) -> Box:
    """A ``side`` px square centred on pixel ``(cx, cy)``, moved inside the frame; along an axis shorter
    than ``side`` it spans the whole axis (the resize then pads)."""

    def span(centre: float, length: int) -> tuple[float, float]:
        if side >= length:
            return 0.0, 1.0
        start = min(max(centre - side / 2, 0.0), length - side)
        return start / length, (start + side) / length

    (x0, x1), (y0, y1) = span(cx, width), span(cy, height)
    return x0, y0, x1, y1


def grow(box: Box, margin: float) -> Box:
    """``box`` grown by ``margin`` of its width/height on each side, clipped to the frame."""
    dx, dy = (box[2] - box[0]) * margin, (box[3] - box[1]) * margin
    return max(box[0] - dx, 0.0), max(box[1] - dy, 0.0), min(box[2] + dx, 1.0), min(box[3] + dy, 1.0)


def mask_box(mask: np.ndarray) -> Box | None:
    """The bounding box of a 2-D boolean mask's true pixels, or None when there are none."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    h, w = mask.shape
    return cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h


@functools.cache
def _face_cascade() -> cv2.CascadeClassifier:
    # OpenCV's frontal-face Haar cascade ships inside opencv-python-headless: nothing is downloaded
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError(f"cannot load OpenCV's face cascade from {cv2.data.haarcascades}")
    return cascade


def face_box(frames: np.ndarray, scale: float = 1.8) -> Box:
    """A square around the clip's face: the largest face in each of up to ``FACE_DETECT_FRAMES`` frames,
    their median centre and size, the side grown ``scale`` times (the detector boxes eyes to mouth)."""
    h, w = frames.shape[1:3]
    up = max(1.0, FACE_DETECT_MIN_SIDE / min(h, w))
    picks = np.unique(
        np.linspace(0, len(frames) - 1, min(len(frames), FACE_DETECT_FRAMES)).round().astype(int)
    )
    faces = []
    for frame in frames[picks]:
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if up > 1:
            grey = cv2.resize(grey, (round(w * up), round(h * up)), interpolation=cv2.INTER_LINEAR)
        found = _face_cascade().detectMultiScale(
            cv2.equalizeHist(grey), scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)
        )
        if len(found):
            # the stubs say a sequence of rects; OpenCV returns an (n, 4) int array when it finds any
            x, y, fw, fh = max(np.asarray(found, dtype=float), key=lambda b: b[2] * b[3]) / up
            faces.append((x + fw / 2, y + fh / 2, max(fw, fh)))
    if not faces:
        raise ValueError(f"no face found in {len(picks)} of its frames (OpenCV Haar cascade)")
    cx, cy, side = np.median(np.array(faces), axis=0)
    return square_box(cx, cy, side * scale, h, w)


def foreground_box(frames: np.ndarray, threshold: int = 25) -> Box:
    """The box of everything that moves: pixels that differ from the clip's temporal median (its
    background) by more than ``threshold`` in some frame, specks removed, grown by ``BODY_MARGIN``.
    A static clip (or one of under 3 frames) keeps the whole frame."""
    if len(frames) < 3:
        return FULL
    h, w = frames.shape[1:3]
    scale = min(1.0, 128 / max(h, w))  # the box needs no detail: work on ≤ 128 px frames
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]).astype(np.int16)
    background = np.median(small, axis=0).astype(np.int16)
    moving = (np.abs(small - background).max(-1) > threshold).any(0).astype(np.uint8)
    moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    box = mask_box(moving.astype(bool))
    return FULL if box is None else grow(box, BODY_MARGIN)


def depth_box(depth: np.ndarray) -> Box | None:
    """The box of a depth video's non-zero pixels over all its frames (``(H, W, T)``, background removed
    as in UTD-MHAD), grown by ``BODY_MARGIN``; None when it is all zero."""
    box = mask_box((depth != 0).any(-1) if depth.ndim == 3 else depth != 0)
    return None if box is None else grow(box, BODY_MARGIN)


def make_cropper(mode: str, face_scale: float, body: Cropper | None = None) -> Cropper:
    """The cropper of a ``data.crop`` mode (``auto`` resolved by the reader); ``body``: the dataset's
    own body box (depth maps, an official box), else the foreground box."""
    croppers: dict[str, Cropper] = {
        "none": full_box,
        "center": center_box,
        "face": functools.partial(face_box, scale=face_scale),
        "body": body or foreground_box,
    }
    if mode not in croppers:
        raise ValueError(f"data.crop: unknown mode {mode!r}; expected one of {', '.join(croppers)}")
    return croppers[mode]


def crop_and_resize(frames: np.ndarray, box: Box, size: int) -> np.ndarray:
    """``(T, size, size, 3)`` uint8: ``box`` of every frame, its long side resized to ``size`` (area
    averaging when shrinking), centred on black padding as the official ``misc.resize`` does."""
    t, h, w = frames.shape[:3]
    x0, x1 = min(math.floor(box[0] * w), w - 1), max(math.ceil(box[2] * w), 1)
    y0, y1 = min(math.floor(box[1] * h), h - 1), max(math.ceil(box[3] * h), 1)
    crop = frames[:, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
    ch, cw = crop.shape[1:3]
    scale = size / max(ch, cw)
    nw, nh = min(size, max(1, round(cw * scale))), min(size, max(1, round(ch * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = np.zeros((t, size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    for i in range(t):
        out[i, top : top + nh, left : left + nw] = cv2.resize(
            np.ascontiguousarray(crop[i]), (nw, nh), interpolation=interpolation
        )
    return out
