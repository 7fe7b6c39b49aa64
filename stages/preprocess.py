"""preprocess: the selected dataset → cropped/resized frames (Zarr) + a Parquet manifest.

Every clip keeps its frames (all of them for the embedded dataset, at most ``data.max_frames`` evenly
spaced ones for real videos: the LFAE trains on frame pairs from anywhere in a clip) and records the
K time-sorted frame indices that the diffusion model sees (``data.frame_sampling``). Clips that cannot
be used are skipped with a warning and listed with the reason in ``<paths.metrics>/preprocess_skipped.json``.
"""

from __future__ import annotations

from pathlib import Path

from lfdm.config import Params
from lfdm.data.prepare import prepare_dataset

SKIPPED_FILE = "preprocess_skipped.json"


def run(p: Params) -> dict[str, float]:
    return prepare_dataset(
        p.data, p.seed, p.paths.frames, p.paths.manifest, Path(p.paths.metrics) / SKIPPED_FILE
    )
