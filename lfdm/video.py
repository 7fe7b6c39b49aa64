"""Video IO: PyAV (FFmpeg) for containers, Pillow for image folders and GIF output.

Frames are RGB ``uint8`` arrays ``(H, W, 3)``. A "video" is any container FFmpeg can demux (mp4, avi,
mov, mkv, webm, gif, ...) or a folder of images, read in natural order (``frame2`` before ``frame10``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.error import FFmpegError
from PIL import Image

from lfdm.errors import MissingInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def _natural_key(path: Path) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _image_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    return files


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → ``(H, W, 3)`` uint8; 16/32-bit integer greys are rescaled, not clipped."""
    if image.mode.startswith("I"):  # I, I;16, I;16B, ...: 16-bit PNGs open as these
        grey = np.asarray(image, dtype=np.float64) / 65535 * 255
        return np.repeat(grey.clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        grey = grey * 255 if grey.max(initial=0) <= 1 else grey  # float images in [0, 1] or [0, 255]
        return np.repeat(grey.clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))  # drops alpha, expands palettes and greys


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """``(width, height)`` shrunk so the long side is ``max_side``; None when it already fits."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _read_image(path: Path, max_side: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if size := _scaled_size(*image.size, max_side):
                image.draft(None, size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below `size`
            rgb = _to_rgb(image)
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: unreadable image: {err}") from err
    if size := _scaled_size(rgb.shape[1], rgb.shape[0], max_side):
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))  # area average
    return rgb


def iter_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Stream the frames of a video file or image folder, one ``(H, W, 3)`` uint8 array at a time."""
    for _, frame in iter_indexed_frames(path):
        yield frame


def iter_indexed_frames(
    path: str | Path, wanted: Collection[int] | None = None, max_side: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Stream ``(index, frame)`` for the frames whose index is in ``wanted`` (all when None), in order.

    Made for long or huge videos: unwanted frames are decoded (inter-frame codecs need them) but never
    converted to RGB, unwanted image files are never opened, and decoding stops after the last wanted
    index. ``max_side``: a larger frame is downscaled (area average) while it is converted, so no
    full-resolution RGB copy exists; JPEG frames are even decoded at reduced scale.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such video file or frame folder")
    last = None if wanted is None else max(wanted, default=-1)
    if last is not None and last < 0:
        return
    if path.is_dir():
        for i, file in enumerate(_image_files(path)):
            if wanted is None or i in wanted:
                yield i, _read_image(file, max_side)
            if i == last:
                return
        return
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                count += 1
                if wanted is None or i in wanted:
                    if size := _scaled_size(frame.width, frame.height, max_side):
                        w, h = size
                        yield i, frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
                    else:
                        yield i, frame.to_ndarray(format="rgb24")
                if i == last:
                    return
    except FFmpegError as err:
        raise ValueError(f"{path}: cannot decode video: {err}") from err
    if not count:
        raise ValueError(f"{path}: no decodable frames")


def count_frames(path: str | Path) -> int:
    """Number of frames; counts demuxed packets for containers (exact for one frame per packet, no decoding)."""
    path = Path(path)
    if path.is_dir():
        return len(_image_files(path))
    if not path.exists():
        raise MissingInput(f"{path}: no such video file or frame folder")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
    except FFmpegError as err:
        raise ValueError(f"{path}: cannot read video: {err}") from err


def read_video(path: str | Path, indices: Sequence[int] | None = None) -> np.ndarray:
    """``(T, H, W, 3)`` uint8: all frames, or ``indices`` (any order, repeats allowed) kept while streaming."""
    if indices is None:
        return np.stack(list(iter_frames(path)))
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"{path}: empty frame index list")
    if min(indices) < 0:
        raise ValueError(f"{path}: frame indices must be non-negative, got {min(indices)}")
    wanted, last, kept = set(indices), max(indices), {}
    for i, frame in enumerate(iter_frames(path)):
        if i in wanted:
            kept[i] = frame
        if i == last:
            break
    if last not in kept:
        raise IndexError(f"{path}: frame {last} requested, the video has {i + 1} frames")
    return np.stack([kept[i] for i in indices])


def _as_uint8(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"expected uint8 or float frames in [0, 1], got {frames.dtype}")
    return (frames.clip(0, 1) * 255).round().astype(np.uint8)


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    # yuv420p stores chroma at half resolution, so the encoder needs even sizes: replicate the edge.
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "17"}  # near-lossless, still ~10× smaller than raw
        else:
            stream.bit_rate = max(int(4 * frames.shape[1] * frames.shape[2] * fps), 64_000)  # 4 bits/pixel
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush delayed frames


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    # Pillow quantises each frame to its own 256-colour palette and merges identical consecutive frames
    # into one longer frame, so a GIF keeps the timing but not always the frame count.
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float = 8) -> Path:
    """Write ``frames (T, H, W, 3)`` (uint8, or float in [0, 1]) to ``.mp4`` (H.264/MPEG-4) or ``.gif``."""
    path = Path(path)
    writer = {".mp4": _write_mp4, ".gif": _write_gif}.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"{path}: cannot write {path.suffix or 'suffix-less'!r} videos, use .mp4 or .gif")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _as_uint8(frames)
    if not len(frames):
        raise ValueError(f"{path}: no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path, frames, fps)
    return path
