"""Every bad input, one test each: a clip that cannot be used is skipped (warning + record) while the
others go on; a bad labels.csv, dataset root or params value is an error naming the file, key or value."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
from PIL import Image
from test_datasets import (
    assert_close,
    carphone,
    clips_of,
    encode,
    folder_cfg,
    frame_folder,
    resized,
    run_preprocess,
    write_labels,
)

from lfdm.config import DataConfig, ParamsError, parse_params
from lfdm.data.clips import DatasetError
from lfdm.data.prepare import ShortClipWarning
from lfdm.data.sources import SkippedClipWarning, iter_dataset
from lfdm.video import write_video


def dataset_with(tmp_path: Path, name: str, make) -> tuple[dict, list]:
    """A folder dataset of two good clips plus ``name`` (written by ``make(path)``); its clips and skips."""
    root = tmp_path / "ds"
    frame_folder(root / "good1", carphone(4))
    frame_folder(root / "good2", carphone(4))
    make(root / name)
    write_labels(root, f"video,label,split\ngood1,talk,train\n{name},talk,train\ngood2,nod,test\n")
    return clips_of(folder_cfg(root))


def assert_skipped(clips: dict, skips: list, video_id: str, reason: str) -> None:
    assert sorted(clips) == ["good1", "good2"]  # the rest is processed
    (skip,) = skips
    assert skip.video_id == video_id
    assert reason in skip.reason, skip.reason


# ---------------------------------------------------------------------------------- bad clips


@pytest.mark.parametrize(
    "damage",
    [lambda b: np.random.default_rng(0).bytes(4096), lambda b: b[: len(b) // 3], lambda b: b""],
    ids=["random-bytes", "truncated", "zero-bytes"],
)
def test_corrupt_video_is_skipped(tmp_path, damage) -> None:
    def make(path: Path) -> None:
        good = write_video(tmp_path / "src.mp4", carphone(8)).read_bytes()
        path.write_bytes(damage(good))

    clips, skips = dataset_with(tmp_path, "broken.mp4", make)
    assert_skipped(clips, skips, "broken", "broken.mp4")
    assert "replace or re-encode it, or leave the clip out" in skips[0].reason


def test_unreadable_frame_in_a_folder_is_skipped(tmp_path) -> None:
    def make(path: Path) -> None:
        frame_folder(path, carphone(3))
        (path / "frame1.png").write_bytes(b"\x89PNG not really")

    clips, skips = dataset_with(tmp_path, "frames", make)
    assert_skipped(clips, skips, "frames", "frame1.png")


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_zero_frame_video_is_skipped(tmp_path, suffix) -> None:
    def make(path: Path) -> None:
        container = av.open(str(path), mode="w")
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
        container.close()

    clips, skips = dataset_with(tmp_path, f"empty{suffix}", make)
    assert_skipped(clips, skips, "empty", f"empty{suffix}")
    assert any(s in skips[0].reason for s in ("0 frame(s)", "no video stream", "no decodable frames"))


def test_empty_frame_folder_is_skipped(tmp_path) -> None:
    clips, skips = dataset_with(tmp_path, "nothing", lambda path: path.mkdir())
    assert_skipped(clips, skips, "nothing", "no image files")


def test_one_frame_video_is_skipped(tmp_path) -> None:
    clips, skips = dataset_with(tmp_path, "still.mp4", lambda path: write_video(path, carphone(1)))
    assert_skipped(clips, skips, "still", "1 frame(s); a clip needs at least 2")


def test_missing_video_is_skipped(tmp_path) -> None:
    clips, skips = dataset_with(tmp_path, "gone.mp4", lambda path: None)
    assert_skipped(clips, skips, "gone", "gone.mp4: no such video file")
    assert "check the path, or leave the clip out" in skips[0].reason


# ------------------------------------------------------------------------- special files


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail instead of hanging: opening a FIFO blocks until something writes to it."""

    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds} s (a FIFO or device was opened?)")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_named_pipe_video_is_skipped_not_opened(tmp_path) -> None:
    with deadline():
        clips, skips = dataset_with(tmp_path, "pipe.mp4", os.mkfifo)
    assert_skipped(clips, skips, "pipe", "pipe.mp4: a named pipe (FIFO), not a regular file")
    assert "put the file itself there or leave the clip out" in skips[0].reason


def test_named_pipe_frame_in_a_folder_is_skipped_not_opened(tmp_path) -> None:
    def make(path: Path) -> None:
        frame_folder(path, carphone(3))
        (path / "frame1.png").unlink()
        os.mkfifo(path / "frame1.png")

    with deadline():
        clips, skips = dataset_with(tmp_path, "frames", make)
    assert_skipped(clips, skips, "frames", "frames/frame1.png: a named pipe (FIFO)")


def test_device_file_is_skipped_not_read(tmp_path) -> None:
    # MHAD finds its videos by name anywhere under the root; this one is a link to a character device
    root = tmp_path / "UTD-MHAD"
    frames = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((320, 240)))[None].repeat(3, 0)
    encode(root / "a1_s1_t1_color.avi", frames, "mpeg4")
    os.symlink("/dev/zero", root / "a1_s4_t1_color.avi")
    with deadline():
        clips, skips = clips_of(DataConfig(dataset="mhad", root=str(root), image_size=32, num_frames=4))
    assert list(clips) == ["a1_s1_t1"]
    assert [s.video_id for s in skips] == ["a1_s4_t1"] and "a character device" in skips[0].reason


def test_broken_symlink_is_skipped_naming_its_target(tmp_path) -> None:
    clips, skips = dataset_with(
        tmp_path, "link.mp4", lambda path: os.symlink(path.parent / "moved.mp4", path)
    )
    assert_skipped(clips, skips, "link", "link.mp4: a broken symlink (to ")
    assert "moved.mp4); point it at the file or leave the clip out" in skips[0].reason


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir], ids=["fifo", "folder"])
def test_labels_csv_not_a_regular_file(tmp_path, make) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    make(root / "labels.csv")
    with deadline(), pytest.raises(DatasetError, match=r"labels\.csv: not a regular file"):
        iter_dataset(folder_cfg(root), 0)


# ---------------------------------------------------------------------------- short clips


def test_clips_shorter_than_k_are_named_at_preprocess(tmp_path) -> None:
    root = tmp_path / "ds"
    frame_folder(root / "short", carphone(3))
    frame_folder(root / "long", carphone(12))
    frame_folder(root / "test", carphone(12))
    write_labels(root, "video,label,split\nshort,talk,train\nlong,talk,train\ntest,talk,test\n")
    with pytest.warns(
        ShortClipWarning,
        match=r"1 clip\(s\) have fewer frames than data\.num_frames=5: short \(3\); .*lower data\.num_frames "
        "or leave these clips out",
    ):
        metrics, rows, _ = run_preprocess(
            tmp_path, dataset="folder", root=str(root), num_frames=5, max_frames=8
        )
    assert metrics["videos"] == 3 and [r.video_id for r in rows] == ["short", "long", "test"]  # nothing lost


def test_frames_of_different_sizes_are_skipped(tmp_path) -> None:
    def make(path: Path) -> None:
        frame_folder(path, carphone(2))
        Image.fromarray(carphone(3)[2, :100]).save(path / "frame2.png")

    clips, skips = dataset_with(tmp_path, "mixed", make)
    assert_skipped(clips, skips, "mixed", "frames differ in size")


def test_clip_without_a_face_is_skipped_under_face_crop(tmp_path) -> None:
    root = tmp_path / "ds"
    frame_folder(root / "face", carphone(4))
    frame_folder(root / "coffee", np.repeat(skimage.data.coffee()[None], 3, 0))
    write_labels(root, "video,label,split\nface,talk,train\ncoffee,steam,test\n")
    clips, skips = clips_of(folder_cfg(root, crop="face"))
    assert list(clips) == ["face"]
    assert [s.video_id for s in skips] == ["coffee"] and "no face found" in skips[0].reason


def test_corrupt_mhad_depth_map_is_skipped(tmp_path) -> None:
    root = tmp_path / "UTD-MHAD"
    frames = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((320, 240)))[None].repeat(3, 0)
    encode(root / "a1_s1_t1_color.avi", frames, "mpeg4")
    encode(root / "a1_s4_t1_color.avi", frames, "mpeg4")
    (root / "a1_s1_t1_depth.mat").write_bytes(b"MATLAB 5.0 MAT-file, broken")
    clips, skips = clips_of(DataConfig(dataset="mhad", root=str(root), image_size=32, num_frames=4))
    assert list(clips) == ["a1_s4_t1"]
    assert [s.video_id for s in skips] == ["a1_s1_t1"] and "a1_s1_t1_depth.mat" in skips[0].reason


def test_skips_warn_and_all_skipped_fails_preprocess(tmp_path) -> None:
    root = tmp_path / "ds"
    (root / "bad").mkdir(parents=True)
    write_video(root / "short.mp4", carphone(1))
    write_labels(root, "video,label,split\nbad,talk,train\nshort.mp4,talk,test\n")
    with pytest.warns(SkippedClipWarning) as record:
        list(iter_dataset(folder_cfg(root), 0))
    assert [str(w.message).split(":")[0] for w in record] == ["skipped clip bad", "skipped clip short"]
    with (
        pytest.warns(SkippedClipWarning),
        pytest.raises(DatasetError, match=r"no usable train clips .*preprocess_skipped\.json"),
    ):
        run_preprocess(tmp_path, dataset="folder", root=str(root))
    report = json.loads((tmp_path / "metrics" / "preprocess_skipped.json").read_text())
    assert report["count"] == 2 and [s["video_id"] for s in report["skipped"]] == ["bad", "short"]


# ------------------------------------------------------------------------------- image modes


def _modes() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Pillow image of each awkward mode → the RGB frame it must become."""
    rgb = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((64, 48)))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return {
        "grayscale": (Image.fromarray(grey), np.repeat(grey[..., None], 3, -1)),
        "rgba": (Image.fromarray(np.dstack([rgb, np.full(grey.shape, 90, np.uint8)])), rgb),
        "16-bit": (Image.fromarray(grey.astype(np.uint16) * 257), np.repeat(grey[..., None], 3, -1)),
        "palette": (palette, np.asarray(palette.convert("RGB"))),
    }


@pytest.mark.parametrize("mode", ["grayscale", "rgba", "16-bit", "palette"])
def test_image_modes_become_rgb(tmp_path, mode) -> None:
    image, expected = _modes()[mode]
    root = tmp_path / "ds"
    (root / "clip").mkdir(parents=True)
    for i in range(3):
        image.save(root / "clip" / f"{i}.png")
    write_labels(root, "video,label,split\nclip,stand still,train\n")
    clips, skips = clips_of(folder_cfg(root))
    assert not skips
    np.testing.assert_array_equal(clips["clip"].frames, resized(np.repeat(expected[None], 3, 0)))


# ---------------------------------------------------------------------------------- big and odd


@pytest.mark.parametrize("kind", ["jpeg-folder", "mp4"])
def test_very_large_frames_stream_without_buffering_the_clip(tmp_path, kind) -> None:
    root = tmp_path / "ds"
    w, h = (4000, 3000) if kind == "jpeg-folder" else (1920, 1080)
    big = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((w, h)))
    frames = np.stack([np.roll(big, 200 * i, axis=1) for i in range(3)])
    if kind == "mp4":
        encode(root / "big.mp4", frames)
        name = "big.mp4"
    else:
        frame_folder(root / "big", frames, ".jpg")
        name = "big"
    write_labels(root, f"video,label,split\n{name},pan,train\n")
    small = resized(frames, 32)
    del big, frames

    tracemalloc.start()
    try:
        clips, skips = clips_of(folder_cfg(root))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not skips
    assert peak < w * h * 3 / 2  # less than one full-resolution RGB frame, let alone the clip
    assert_close(clips[name.removesuffix(".mp4")].frames, small, tol=4.0)


def test_variable_frame_rate_is_read_as_a_frame_sequence(tmp_path) -> None:
    frames = carphone(12)
    path = tmp_path / "ds" / "vfr.mkv"
    path.parent.mkdir(parents=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        pts = np.cumsum([0, 33, 33, 100, 10, 250, 33, 33, 500, 20, 33, 33])  # irregular gaps, in ms
        for frame, t in zip(frames, pts, strict=True):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = int(t), Fraction(1, 1000)
            container.mux(stream.encode(vf))
        container.mux(stream.encode())
    with av.open(str(path)) as container:  # really variable: the gaps survive in the file
        gaps = np.diff(sorted(p.pts for p in container.demux(video=0) if p.pts is not None))
        assert gaps.min() * 10 < gaps.max()
    write_labels(path.parent, "video,label,split\nvfr.mkv,talk,train\n")
    clips, skips = clips_of(folder_cfg(path.parent, max_frames=12))
    assert not skips
    assert_close(clips["vfr"].frames, resized(frames), tol=4.0)  # all 12, in order, none doubled


# ------------------------------------------------------------------------------------ labels.csv


def labels_error(tmp_path: Path, text: str | bytes | None, match: str) -> None:
    root = tmp_path / "ds"
    frame_folder(root / "a", carphone(2))
    frame_folder(root / "b", carphone(2))
    if isinstance(text, bytes):
        (root / "labels.csv").write_bytes(text)
    elif text is not None:
        (root / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        iter_dataset(folder_cfg(root), 0)  # raised at once, before any video is read


def test_labels_csv_missing(tmp_path) -> None:
    labels_error(tmp_path, None, r"ds/labels\.csv: no such file")


@pytest.mark.parametrize("text", ["", "\n\n  \n", "\ufeff"], ids=["zero-bytes", "blank-lines", "bom-only"])
def test_labels_csv_empty(tmp_path, text) -> None:
    labels_error(tmp_path, text, r"labels\.csv: empty; expected a header")


def test_labels_csv_header_only(tmp_path) -> None:
    labels_error(tmp_path, "video,label\n", r"labels\.csv: no clips, only a header")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("video,caption\na,x\n", r"missing column\(s\) 'label'.*found \['video', 'caption'\]"),
        ("path;label\na;x\n", r"missing column\(s\) 'video'"),
        ("video,label,label\na,x,y\n", r"duplicate column\(s\) 'label'"),
    ],
    ids=["label", "semicolons", "duplicate"],
)
def test_labels_csv_missing_columns(tmp_path, text, match) -> None:
    labels_error(tmp_path, text, match)


def test_labels_csv_unknown_split(tmp_path) -> None:
    labels_error(
        tmp_path,
        "video,label,split\na,x,train\nb,y,validation\n",
        r"line 3: video 'b': unknown split 'validation'; expected train or test",
    )


def test_labels_csv_duplicate_ids(tmp_path) -> None:
    labels_error(
        tmp_path, "video,label\na,x\nb,y\n./a,z\n", r"line 4: video './a' is already listed on line 2"
    )
    write_video(tmp_path / "ds" / "c.mp4", carphone(2))
    write_video(tmp_path / "ds" / "c.gif", carphone(2))
    labels_error(
        tmp_path,
        "video,label\nc.mp4,x\nc.gif,y\n",
        r"line 3: video 'c\.gif' gets video id 'c', as line 2 does",
    )


@pytest.mark.parametrize(
    ("video", "match"),
    [
        ("../outside.mp4", r"'\.\.' leaves the dataset directory"),
        ("/etc/hosts", "absolute path"),
        ("link.mp4", r"resolves to .*outside\.mp4, outside the dataset directory"),
        ("linkdir", r"resolves to .*, outside the dataset directory"),
        ("frames", r"frame 1\.png resolves to .*outside\.png, outside the dataset directory"),
    ],
    ids=["dotdot", "absolute", "symlink-file", "symlink-folder", "symlink-frame"],
)
def test_labels_csv_paths_may_not_leave_the_directory(tmp_path, video, match) -> None:
    write_video(tmp_path / "outside.mp4", carphone(2))
    Image.fromarray(carphone(1)[0]).save(tmp_path / "outside.png")
    root = tmp_path / "ds"
    frame_folder(root / "frames", carphone(1))
    os.symlink(tmp_path / "outside.mp4", root / "link.mp4")
    os.symlink(tmp_path, root / "linkdir")
    os.symlink(tmp_path / "outside.png", root / "frames" / "1.png")
    labels_error(tmp_path, f"video,label\na,x\n{video},y\n", rf"line 3: video '{video}': {match}")


def test_labels_csv_not_utf8(tmp_path) -> None:
    labels_error(
        tmp_path,
        b"video,label\na,smile\nb," + "sourire génial\n".encode("latin-1"),
        r"labels\.csv: line 3: not UTF-8 text \(byte 0xe9\); save it as UTF-8",
    )


def test_labels_csv_empty_label(tmp_path) -> None:
    labels_error(tmp_path, "video,label\na,smile\nb,  \n", r"line 3: video 'b': empty 'label'")


@pytest.mark.parametrize(
    "label", ["wave\0", '"raise\nboth arms"', "nod\x1b[31m"], ids=["nul", "newline", "escape"]
)
def test_labels_csv_label_with_a_control_character(tmp_path, label) -> None:
    labels_error(
        tmp_path,
        f"video,label\na,smile\nb,{label}\n",
        r"line 3: video 'b': label .* holds a control character",
    )


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("anna/ben", "holds a path separator"),
        ("anna\\ben", "holds a path separator"),
        ("anna\0", "holds a control character"),
        ("..", "is '.', '..' or starts with '__'"),
        ("__anna", "is '.', '..' or starts with '__'"),
        ("a" * 201, "is longer than 200 bytes"),
    ],
    ids=["slash", "backslash", "nul", "dotdot", "dunder", "long"],
)
def test_labels_csv_subject_that_cannot_name_a_file(tmp_path, subject, why) -> None:
    labels_error(
        tmp_path,
        f"video,label,subject\na,smile,me\nb,smile,{subject}\n",
        rf"line 3: video 'b': subject .* {why}: it names the generated videos' files .*; rename it",
    )


def test_labels_csv_empty_subject(tmp_path) -> None:
    labels_error(
        tmp_path,
        "video,label,subject\na,smile,me\nb,smile, \n",
        r"line 3: video 'b': empty 'subject' \(fill it in or drop the column\)",
    )


def test_labels_csv_wrong_field_count(tmp_path) -> None:
    labels_error(
        tmp_path, "video,label\na,smile,extra\nb\n", r"line 2: 3 fields, the header has 2\n  line 3: 1 fields"
    )


def test_labels_csv_not_csv(tmp_path) -> None:
    labels_error(tmp_path, "video,label\na," + "x" * 200_000 + "\n", r"line 2: not valid CSV: field larger")


def test_labels_csv_single_subject_cannot_be_split(tmp_path) -> None:
    labels_error(
        tmp_path, "video,label,subject\na,x,me\nb,y,me\n", r"single subject 'me': cannot hold one out"
    )


def test_labels_csv_lists_every_problem_at_once(tmp_path) -> None:
    rows = "".join(f"v{i},\n" for i in range(25))
    labels_error(tmp_path, "video,label\n" + rows, r"line 2: .*empty 'label'(.|\n)*\.\.\. and 5 more")


# -------------------------------------------------------------------------------- other datasets


def test_dataset_root_missing(tmp_path) -> None:
    cfg = DataConfig(dataset="mug", root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"data\.root=.*nowhere.*no such directory \(the mug dataset\)"):
        iter_dataset(cfg, 0)


@pytest.mark.parametrize("dataset", ["mug", "mhad", "faceforensics"])
def test_dataset_without_clips(tmp_path, dataset) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match=str(tmp_path)):
        iter_dataset(DataConfig(dataset=dataset, root=str(tmp_path)), 0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "no segmentation.txt"),
        ("// Subject 2\n2,25,1\n1:1,10\n", r"line 2: gesture 25 is not in 1\.\.24"),
        ("// Subject 2\n1:1,10\n", r"line 2: '1:1,10': expected repetition:first,last"),
        ("// Subject 2\n2,1,1\n1:10,5\n", r"line 3: '1:10,5'"),
        ("// Subject 2\n2,1,1\nfirst rep 1-10\n", r"line 3: cannot parse 'first rep 1-10'"),
    ],
    ids=["missing", "gesture", "orphan", "reversed", "garbage"],
)
def test_natops_bad_segmentation(tmp_path, text, match) -> None:
    if text is not None:
        (tmp_path / "segmentation.txt").write_text(text)
    with pytest.raises(DatasetError, match=match):
        iter_dataset(DataConfig(dataset="natops", root=str(tmp_path)), 0)


# -------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"dataset": "folder"}, r"data: .*root: data\.dataset=folder needs data\.root"),
        (
            {"num_frames": 10, "max_frames": 8},
            r"max_frames: 8 stored frames per clip cannot give num_frames=10",
        ),
        ({"max_frames": 1}, r"data\.max_frames: .*greater than or equal to 2"),
        ({"test_fraction": 0}, r"data\.test_fraction: .*greater than 0"),
        ({"test_fraction": 1.0}, r"data\.test_fraction: .*less than 1"),
        ({"face_scale": 0.5}, r"data\.face_scale: .*greater than or equal to 1"),
        ({"crop": "hands"}, r"data\.crop: .*'auto', 'none', 'center', 'face' or 'body'"),
        ({"crop": "face"}, r"crop: 'face' needs a real dataset"),
        ({"max_frames": "many"}, r"data\.max_frames: .*valid integer"),
    ],
    ids=[
        "no-root",
        "max-below-k",
        "max-1",
        "fraction-0",
        "fraction-1",
        "face-scale",
        "crop-unknown",
        "crop-embedded",
        "max-type",
    ],
)
def test_impossible_params(data, match) -> None:
    with pytest.raises(ParamsError, match=match):
        parse_params({"data": data}, "params.yaml")


@pytest.mark.parametrize(("option", "value"), [("--eta", "2"), ("--steps", "0"), ("--guidance", "-1")])
def test_generate_rejects_out_of_range_sampler_options(tmp_path, capsys, option, value) -> None:
    from lfdm.cli import main

    params = Path(__file__).parents[2] / "params.yaml"
    argv = [
        "--params",
        str(params),
        "generate",
        "--image",
        str(tmp_path / "x.png"),
        "--label",
        "zoom in",
        "--out",
        str(tmp_path / "x.gif"),
        option,
        value,
    ]
    assert main(argv) == 2
    assert option.removeprefix("--") in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["no-such-folder", "not-a-model", "unregistered"])
def test_serve_names_a_model_it_cannot_load(tmp_path, capsys, monkeypatch, kind) -> None:
    from lfdm.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "folder").mkdir()
    source = {
        "no-such-folder": str(tmp_path / "nope"),
        "not-a-model": str(tmp_path / "folder"),
        "unregistered": "models:/nope@champion",
    }[kind]
    assert main(["serve", source]) == 1
    err = capsys.readouterr().err
    assert source in err and "Traceback" not in err


# ------------------------------------------------------------------------------ the table in docs


def test_the_reliability_table_cites_tests_that_exist() -> None:
    """docs/reliability.md: every row names a test function that exists, and a parameter id it defines."""
    repo = Path(__file__).parents[2]
    rows = [r for r in (repo / "docs" / "reliability.md").read_text().splitlines() if r.startswith("| ")]
    cited = [r.rsplit("|", 2)[-2].strip().strip("`") for r in rows if not r.startswith("| input or fault")]
    assert len(cited) >= 40
    for node in cited:
        path, _, test = node.partition("::")
        name, _, param = test.removesuffix("]").partition("[")
        source = (repo / path).read_text()
        assert f"def {name}(" in source, f"docs/reliability.md cites {node}: no such test"
        assert param in source, f"docs/reliability.md cites {node}: {path} defines no parameter {param!r}"
