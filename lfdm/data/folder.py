"""The ``folder`` dataset: your own videos, listed in ``<root>/labels.csv`` (DESIGN.md contract).

Columns (header names are case-insensitive, extra columns are ignored with a warning):

- ``video``: a path relative to ``root``: a video file (mp4, avi, mov, mkv, webm, gif, ...) or a
  folder of png/jpg frames. Absolute paths, ``..`` and symlinks that resolve outside ``root`` are
  refused.
- ``label``: free text, the condition (``raise right arm``); one non-empty line, no control characters.
- ``subject`` (optional): who or what the clip shows; without it every clip is its own subject. It names
  files and Zarr arrays of generated videos (``<subject>__prompt0.gif``), so it may not hold ``/``, ``\\``
  or control characters, start with ``__``, be ``.``/``..`` or longer than 200 bytes.
- ``split`` (optional): ``train`` or ``test`` on every row. Without it, ``data.test_fraction`` of the
  subjects (at least one) are held out for test, chosen from ``seed``.

Every problem with the file itself (not UTF-8, empty, missing columns, bad values, duplicate videos)
is an error naming the file, line and value, raised before any video is read; problems with a video
(missing, corrupt, too short) skip that clip (see ``lfdm.data.clips``).
"""

from __future__ import annotations

import csv
import io
import unicodedata
import warnings
from pathlib import Path, PurePosixPath

from lfdm.config import DataConfig
from lfdm.data.clips import ClipSpec, DatasetError, Source, path_id, shuffled
from lfdm.data.crop import make_cropper
from lfdm.data.manifest import SPLITS
from lfdm.video import IMAGE_SUFFIXES

REQUIRED = ("video", "label")
OPTIONAL = ("subject", "split")
MAX_REPORTED = 20  # problems listed in one error
MAX_SUBJECT_BYTES = 200  # a subject names files (<subject>__prompt0.gif): most file systems allow 255 bytes


def read_labels(root: Path, test_fraction: float, seed: int) -> list[tuple[PurePosixPath, ClipSpec]]:
    """Validate ``root/labels.csv``; its clips in file order as (path relative to ``root``, clip)."""
    path = root / "labels.csv"
    header, rows = _read_csv(path)
    problems: list[str] = []
    real_root = root.resolve()
    specs: list[tuple[int, str, str, str | None, str | None]] = []  # line, video, label, subject, split
    seen_paths: dict[str, int] = {}
    for line, cells in rows:
        if len(cells) != len(header):
            problems.append(f"line {line}: {len(cells)} fields, the header has {len(header)}")
            continue
        row = dict(zip(header, (c.strip() for c in cells), strict=True))
        video, label = row["video"], row["label"]
        if not video:
            problems.append(f"line {line}: empty 'video'")
            continue
        if problem := _path_problem(root, real_root, video):
            problems.append(f"line {line}: video {video!r}: {problem}")
            continue
        key = str(PurePosixPath(video))
        if key in seen_paths:
            problems.append(f"line {line}: video {video!r} is already listed on line {seen_paths[key]}")
            continue
        seen_paths[key] = line
        if not label:
            problems.append(f"line {line}: video {video!r}: empty 'label'")
        elif _control(label):
            problems.append(
                f"line {line}: video {video!r}: label {label!r} holds a control character; "
                "a label is one line of text"
            )
        subject = row.get("subject")
        if subject == "":
            problems.append(f"line {line}: video {video!r}: empty 'subject' (fill it in or drop the column)")
        elif subject is not None and (why := _subject_problem(subject)):
            problems.append(
                f"line {line}: video {video!r}: subject {subject!r} {why}: it names the generated "
                "videos' files (<subject>__prompt0.gif); rename it"
            )
        split = row.get("split")
        if split is not None and split.lower() not in SPLITS:
            problems.append(f"line {line}: video {video!r}: unknown split {split!r}; expected train or test")
        specs.append((line, key, label, subject, None if split is None else split.lower()))

    ids: dict[str, int] = {}
    for line, key, *_ in specs:
        video_id = path_id(PurePosixPath(key))
        if video_id in ids:
            problems.append(
                f"line {line}: video {key!r} gets video id {video_id!r}, as line {ids[video_id]} does"
            )
        ids.setdefault(video_id, line)
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DatasetError(f"{path}:\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more)

    subjects = {key: subject or path_id(PurePosixPath(key)) for _, key, _, subject, _ in specs}
    held: set[str] = set()
    if "split" not in header:
        order = shuffled(list(subjects.values()), seed)
        if len(order) < 2:
            raise DatasetError(
                f"{path}: no 'split' column and a single subject {order[0]!r}: cannot hold one out for "
                "test; add a split column (train/test) or more subjects"
            )
        held = set(order[: min(max(1, round(test_fraction * len(order))), len(order) - 1)])
    return [
        (
            PurePosixPath(key),
            ClipSpec(
                video_id=path_id(PurePosixPath(key)),
                label=label,
                subject=subjects[key],
                split=split or ("test" if subjects[key] in held else "train"),
                source=f"folder:{key}",
            ),
        )
        for _, key, label, _, split in specs
    ]


def folder_sources(root: Path, cfg: DataConfig, seed: int) -> list[Source]:
    """One source per labels.csv row; ``crop: auto`` keeps the whole frame."""
    crop = make_cropper("none" if cfg.crop == "auto" else cfg.crop, cfg.face_scale)
    return [Source(root / rel, (spec,), crop) for rel, spec in read_labels(root, cfg.test_fraction, seed)]


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(normalised header, [(line number, cells)] of the non-blank rows)."""
    if path.exists() and not path.is_file():  # a folder, or a FIFO that would block the read
        raise DatasetError(f"{path}: not a regular file; a folder dataset lists its clips in this CSV file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: no such file; a folder dataset lists its clips there (columns video, label, "
            "optional subject, split)"
        ) from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is fine
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}: line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save it as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    end = 0  # the previous record's last line: a quoted field may span lines, a row is named by its first
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((end + 1, cells))
            end = reader.line_num
    except csv.Error as err:
        raise DatasetError(f"{path}: line {reader.line_num}: not valid CSV: {err}") from None
    if not rows:
        raise DatasetError(
            f"{path}: empty; expected a header with columns video, label (optional subject, split)"
        )
    (line, header_cells), rows = rows[0], rows[1:]
    header = [h.strip().lower() for h in header_cells]
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise DatasetError(f"{path}: line {line}: duplicate column(s) {', '.join(map(repr, duplicated))}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} in the header (line {line}); "
            f"found {header}. Expected video, label and optionally subject, split"
        )
    if extra := [h for h in header if h not in REQUIRED + OPTIONAL]:
        warnings.warn(f"{path}: ignoring column(s) {', '.join(map(repr, extra))}", stacklevel=3)
    if not rows:
        raise DatasetError(f"{path}: no clips, only a header")
    return header, rows


def _control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _subject_problem(subject: str) -> str | None:
    """Why ``subject`` cannot name a file or Zarr array (``<subject>__prompt0``), or None."""
    if "/" in subject or "\\" in subject:
        return "holds a path separator"
    if _control(subject):
        return "holds a control character"
    if subject.startswith("__") or subject in (".", ".."):
        return "is '.', '..' or starts with '__'"
    if len(subject.encode()) > MAX_SUBJECT_BYTES:
        return f"is longer than {MAX_SUBJECT_BYTES} bytes"
    return None


def _path_problem(root: Path, real_root: Path, video: str) -> str | None:
    """Why ``video`` may not be read, or None: it must stay inside ``root``, symlinks resolved."""
    rel = PurePosixPath(video)
    if rel.is_absolute() or video.startswith("~"):
        return "absolute path; paths are relative to the dataset directory"
    if ".." in rel.parts:
        return "'..' leaves the dataset directory"
    full = root / rel
    if not full.resolve().is_relative_to(real_root):
        return f"resolves to {full.resolve()}, outside the dataset directory {real_root} (a symlink?)"
    if full.is_dir():  # a frame folder: its images may be symlinks too
        for image in full.iterdir():
            if image.suffix.lower() in IMAGE_SUFFIXES and not image.resolve().is_relative_to(real_root):
                return f"frame {image.name} resolves to {image.resolve()}, outside the dataset directory"
    return None
