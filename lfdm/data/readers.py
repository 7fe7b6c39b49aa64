"""The paper's datasets as :class:`~lfdm.data.clips.Source` lists: MUG, UTD-MHAD, NATOPS, FaceForensics.

Layouts, labels and subject splits follow the official LFDM code (nihaomiao/CVPR23_LFDM:
``preprocessing/*.py``, ``DM/datasets_*.py``); where to get each dataset and how its files must lie is
in docs/datasets.md. Subjects outside a published split are left out, as the official code does.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from lfdm.config import DataConfig
from lfdm.data.clips import VIDEO_SUFFIXES, ClipSpec, DatasetError, Source, path_id, shuffled
from lfdm.data.crop import Box, Cropper, depth_box, make_cropper, pixel_box

# ---------------------------------------------------------------------------------------------- MUG

MUG_EXPRESSIONS = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
# preprocess_MUG.py: the 52 subjects shuffled with random.seed(1234), 26 / 26
# fmt: off
MUG_TRAIN = frozenset(f"{s:03d}" for s in (8, 17, 21, 28, 30, 31, 34, 36, 37, 38, 39, 42, 43, 44, 45, 55, 60,
                                           61, 62, 63, 71, 75, 76, 77, 83, 84))
MUG_TEST = frozenset(f"{s:03d}" for s in (1, 2, 6, 7, 10, 13, 14, 20, 27, 32, 33, 40, 46, 48, 49, 52, 64, 65, 66,
                                          70, 72, 73, 74, 78, 79, 82))
# fmt: on


def mug_sources(root: Path, cfg: DataConfig, seed: int) -> list[Source]:
    """``<subject>/<expression>/<take>/*.jpg``, or ``<subject>/<session>/<expression>/<take>/*.jpg``
    (subjects 002, 003, 049). Every session is read (the official code reads ``session0`` twice).
    ``crop: auto`` keeps the whole frame, as the official code does."""
    crop = _cropper(cfg, "none")
    sources = []
    for subject_dir in _subdirs(root):
        subject = subject_dir.name
        split = "train" if subject in MUG_TRAIN else "test" if subject in MUG_TEST else None
        if split is None:
            continue
        sessions = [d for d in _subdirs(subject_dir) if d.name.startswith("session")] or [subject_dir]
        for session in sessions:
            for expression in MUG_EXPRESSIONS:
                for take in _subdirs(session / expression):
                    rel = take.relative_to(root)
                    spec = ClipSpec(path_id(rel), expression, subject, split, f"mug:{rel.as_posix()}")
                    sources.append(Source(take, (spec,), crop))
    if not sources:
        raise DatasetError(
            f"{root}: no MUG takes found: expected <subject>/<expression>/<take>/*.jpg with subjects of "
            f"the paper's split (e.g. {root}/001/happiness/take000/img_0000.jpg)"
        )
    return sources


# --------------------------------------------------------------------------------------------- MHAD

MHAD_ACTIONS = (  # DM/datasets_mhad.py's names for actions 1..27
    "right arm swipe to the left",
    "right arm swipe to the right",
    "right hand wave",
    "two hand front clap",
    "right arm throw",
    "cross arms in the chest",
    "basketball shooting",
    "draw x",
    "draw circle clockwise",
    "draw circle counter clockwise",
    "draw triangle",
    "right hand bowling",
    "front boxing",
    "baseball swing from right",
    "tennis forehand swing",
    "two arms curl",
    "tennis serve",
    "two hand push",
    "knock on door",
    "hand catch",
    "pick up and throw",
    "jogging",
    "walking",
    "sit to stand",
    "stand to sit",
    "forward lunge (left foot forward)",
    "squat",
)
MHAD_TRAIN, MHAD_TEST = frozenset({1, 2, 3, 5}), frozenset({4, 6, 7, 8})
# preprocess_MHAD.py: the union of all non-zero depth, rows 0:480, cols 156:492 of the 640×480 RGB
MHAD_BOX: Box = pixel_box((0, 480), (156, 492), 480, 640)
_MHAD_NAME = re.compile(r"a(\d+)_s(\d+)_t(\d+)_(color\.avi|depth\.mat)", re.IGNORECASE)


def mhad_sources(root: Path, cfg: DataConfig, seed: int) -> list[Source]:
    """``a{a}_s{s}_t{t}_color.avi`` anywhere under ``root`` (e.g. ``RGB/``), with the matching
    ``a{a}_s{s}_t{t}_depth.mat`` (e.g. ``Depth/``) when present. ``crop: auto`` is ``body``: the box
    of the clip's depth map, else the official fixed box."""
    videos: dict[tuple[int, int, int], Path] = {}
    depths: dict[tuple[int, int, int], Path] = {}
    for path in sorted(root.rglob("a*_s*_t*_*.*")):
        if m := _MHAD_NAME.fullmatch(path.name):
            kind = videos if m[4].lower() == "color.avi" else depths
            kind[(int(m[1]), int(m[2]), int(m[3]))] = path
    sources = []
    for (a, s, t), path in sorted(videos.items()):
        split = "train" if s in MHAD_TRAIN else "test" if s in MHAD_TEST else None
        if split is None or not 1 <= a <= len(MHAD_ACTIONS):
            continue
        spec = ClipSpec(
            f"a{a}_s{s}_t{t}",
            MHAD_ACTIONS[a - 1],
            f"s{s}",
            split,
            f"mhad:{path.relative_to(root).as_posix()}",
        )
        body = functools.partial(mhad_body_box, depths.get((a, s, t)))
        sources.append(Source(path, (spec,), _cropper(cfg, "body", body)))
    if not sources:
        raise DatasetError(
            f"{root}: no UTD-MHAD videos found: expected a<action>_s<subject>_t<trial>_color.avi files"
        )
    return sources


def mhad_body_box(depth_path: Path | None, frames: np.ndarray) -> Box:
    """The box of the clip's depth map (``d_depth``, background removed), else the official box."""
    if depth_path is None:
        return MHAD_BOX
    import scipy.io  # lazy: only MHAD depth maps need it

    try:
        depth = scipy.io.loadmat(depth_path, variable_names=["d_depth"]).get("d_depth")
    except Exception as err:  # scipy raises anything (IndexError, MatReadError, ...) on a damaged file
        raise ValueError(f"unreadable depth map {depth_path}: {err}") from err
    if depth is None or depth.ndim not in (2, 3):
        raise ValueError(f"depth map {depth_path} has no 2-D/3-D 'd_depth' array")
    return depth_box(depth) or MHAD_BOX


# ------------------------------------------------------------------------------------------- NATOPS

NATOPS_GESTURES = (  # DM/datasets_natops.py's names for gestures 1..24
    "I Have Command",
    "All Clear",
    "Not Clear",
    "Spread Wings",
    "Fold Wings",
    "Lock Wings",
    "Up Hook",
    "Down Hook",
    "Remove Tiedowns",
    "Remove Chocks",
    "Insert Chocks",
    "Move Ahead",
    "Turn Left",
    "Turn Right",
    "Next Marshaller",
    "Slow Down",
    "Stop",
    "Nosegear Steering",
    "Hot Brakes",
    "Brakes On",
    "Brakes Off",
    "Install Tiedowns",
    "Fire",
    "Cut Engine",
)
# preprocess_NATOPS.py: subjects shuffled with random.seed(3407); subject 1 dropped
NATOPS_TRAIN = frozenset({3, 4, 8, 9, 12, 13, 15, 17, 19, 20})
NATOPS_TEST = frozenset({2, 5, 6, 7, 10, 11, 14, 16, 18})
# DM/datasets_natops.py crops y 10:239, x 30:290 of the 320×240 frames
NATOPS_BOX: Box = pixel_box((10, 239), (30, 290), 240, 320)
_NATOPS_VIDEO = re.compile(r"g(\d+)s(\d+)\.avi", re.IGNORECASE)


def natops_sources(root: Path, cfg: DataConfig, seed: int) -> list[Source]:
    """``g{gg}s{ss}.avi`` anywhere under ``root`` (e.g. ``gesture01/g01s03.avi``), cut into the
    repetitions of ``segmentation.txt``: clip ``g{gg}s{ss}p{rr}``. ``crop: auto`` is ``body``: the
    official fixed box."""
    crop = _cropper(cfg, "body", lambda frames: NATOPS_BOX)
    seg_files = sorted(root.rglob("segmentation.txt"))
    if not seg_files:
        raise DatasetError(f"{root}: no segmentation.txt (NATOPS's repetition boundaries) under it")
    segments = parse_natops_segmentation(seg_files[0])
    videos = {
        (int(m[1]), int(m[2])): p
        for p in sorted(root.rglob("*.[aA][vV][iI]"))
        if (m := _NATOPS_VIDEO.fullmatch(p.name))
    }
    sources = []
    for (subject, gesture), reps in sorted(segments.items()):
        split = "train" if subject in NATOPS_TRAIN else "test" if subject in NATOPS_TEST else None
        if split is None:
            continue
        name = f"g{gesture:02d}s{subject:02d}"
        path = videos.get((gesture, subject), root / f"gesture{gesture:02d}" / f"{name}.avi")
        rel = path.relative_to(root).as_posix()
        specs = tuple(
            ClipSpec(
                f"{name}p{rep:02d}",
                NATOPS_GESTURES[gesture - 1],
                f"s{subject:02d}",
                split,
                f"natops:{rel}#{start}-{stop - 1}",
                start,
                stop,
            )
            for rep, start, stop in reps
        )
        sources.append(Source(path, specs, crop))
    return sources


def parse_natops_segmentation(path: Path) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
    """``segmentation.txt`` → {(subject, gesture): [(repetition, first frame, one past last), ...]},
    0-based frames. The file: ``// Subject N`` lines, then per gesture a ``subject,gesture,count``
    line followed by ``repetition:first,last`` lines (1-based, inclusive)."""
    out: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    current: tuple[int, int] | None = None
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text: {err}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        if m := re.fullmatch(r"(\d+)\s*,\s*(\d+)\s*,\s*\d+", line):
            current = int(m[1]), int(m[2])
            if not 1 <= current[1] <= len(NATOPS_GESTURES):
                raise DatasetError(
                    f"{path}: line {number}: gesture {current[1]} is not in 1..{len(NATOPS_GESTURES)}"
                )
            out.setdefault(current, [])
        elif m := re.fullmatch(r"(\d+)\s*:\s*(\d+)\s*,\s*(\d+)", line):
            rep, first, last = map(int, m.groups())
            if current is None or first < 1 or last < first:
                raise DatasetError(
                    f"{path}: line {number}: {line!r}: expected repetition:first,last (1-based, "
                    "first <= last) after a subject,gesture,count line"
                )
            out[current].append((rep, first - 1, last))
        else:
            raise DatasetError(f"{path}: line {number}: cannot parse {line!r}")
    if not out:
        raise DatasetError(f"{path}: no segments")
    return out


# ------------------------------------------------------------------------------------ FaceForensics

FACEFORENSICS_LABEL = "talking"  # the videos carry no action labels: one condition for all
FACEFORENSICS_SUBJECTS = 150  # per split (paper Sec. 4.3)


def faceforensics_sources(root: Path, cfg: DataConfig, seed: int) -> list[Source]:
    """Every video under ``root`` (point it at FaceForensics++ ``original_sequences/youtube/c23/videos``:
    one reporter per video). 150 test and 150 train videos chosen from ``seed``, the others left out;
    under 300 videos, half of them (rounded down) test, the rest train. ``crop: auto`` is ``face``."""
    crop = _cropper(cfg, "face")
    videos = {
        path_id(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
    }
    if not videos:
        raise DatasetError(f"{root}: no videos ({', '.join(VIDEO_SUFFIXES)}) under it")
    order = shuffled(list(videos), seed)
    n_test = min(FACEFORENSICS_SUBJECTS, len(order) // 2)
    n_train = min(FACEFORENSICS_SUBJECTS, len(order) - n_test)
    splits = {
        **dict.fromkeys(order[:n_test], "test"),
        **dict.fromkeys(order[n_test : n_test + n_train], "train"),
    }
    sources = []
    for vid, split in sorted(splits.items()):
        source = f"faceforensics:{videos[vid].relative_to(root).as_posix()}"
        sources.append(Source(videos[vid], (ClipSpec(vid, FACEFORENSICS_LABEL, vid, split, source),), crop))
    return sources


def _cropper(cfg: DataConfig, auto: str, body: Cropper | None = None) -> Cropper:
    return make_cropper(auto if cfg.crop == "auto" else cfg.crop, cfg.face_scale, body)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
