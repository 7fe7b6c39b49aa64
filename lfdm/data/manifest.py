"""The Parquet manifest written by ``preprocess``: one row per clip in the frame store.

Columns: ``video_id`` (str, unique; the frame store's array name), ``label`` (str, the text
condition), ``subject`` (str), ``split`` ("train" | "test"), ``num_frames`` (int32, frames stored),
``source`` (str, where the clip came from), ``frame_indices`` (list<int32>, the K sorted frame indices
the diffusion model uses, drawn once by preprocess). Extra columns are ignored on reading.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lfdm.errors import MissingInput

SPLITS = ("train", "test")
SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("label", pa.string()),
        ("subject", pa.string()),
        ("split", pa.string()),
        ("num_frames", pa.int32()),
        ("source", pa.string()),
        ("frame_indices", pa.list_(pa.int32())),
    ]
)


@dataclass(frozen=True)
class ManifestRow:
    video_id: str
    label: str
    subject: str
    split: str
    num_frames: int
    source: str
    frame_indices: tuple[int, ...]

    def __post_init__(self) -> None:  # accept any int sequence (a list, a numpy array), store a tuple
        object.__setattr__(self, "frame_indices", tuple(int(i) for i in self.frame_indices))


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> None:
    """Validate ``rows`` and write them to ``path`` (parent folders are created)."""
    path = Path(path)
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)
    _validate(table, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_manifest(path: str | Path, split: str | None = None) -> list[ManifestRow]:
    """Rows of ``path`` in file order, only those of ``split`` when given. The whole file is validated,
    so a clip duplicated across splits is caught whichever split is asked for."""
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"{path}: unknown split {split!r} requested; expected one of {SPLITS}")
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise MissingInput(f"manifest {path} does not exist") from None
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
    columns = []
    for field in SCHEMA:
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ValueError(
                f"{path}: column {field.name!r} has type {column.type}, expected {field.type}"
            ) from None
    table = pa.Table.from_arrays(columns, schema=SCHEMA)
    _validate(table, path)
    if split is not None:
        table = table.filter(pc.field("split") == split)
    return [ManifestRow(**r) for r in table.to_pylist()]


def _validate(table: pa.Table, path: Path) -> None:
    """Errors name the file, the column and the offending value."""
    for name in SCHEMA.names:
        if table.column(name).null_count:
            raise ValueError(f"{path}: column {name!r} has {table.column(name).null_count} missing value(s)")
    duplicated = [v for v, n in Counter(table.column("video_id").to_pylist()).items() if n > 1]
    if duplicated:
        raise ValueError(f"{path}: column 'video_id': duplicate value {duplicated[0]!r}")
    unknown = [s for s in table.column("split").to_pylist() if s not in SPLITS]
    if unknown:
        raise ValueError(f"{path}: column 'split': unknown value {unknown[0]!r}; expected one of {SPLITS}")
    for row in table.select(["video_id", "num_frames", "frame_indices"]).to_pylist():
        n, idx = row["num_frames"], row["frame_indices"]
        if n < 1 or not idx or any(not 0 <= i < n for i in idx) or idx != sorted(idx):
            raise ValueError(
                f"{path}: video {row['video_id']!r}: column 'frame_indices' {idx} must be sorted "
                f"indices in [0, num_frames={n})"
            )
