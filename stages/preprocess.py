"""preprocess: the selected dataset → cropped/resized frames (Zarr) + a Parquet manifest.

Every clip keeps its frames (all of them for the embedded dataset, at most ``data.max_frames`` evenly
spaced ones for real videos: the LFAE trains on frame pairs from anywhere in a clip) and records the
K time-sorted frame indices that the diffusion model sees (``data.frame_sampling``). Clips that cannot
be used are skipped with a warning and listed with the reason in ``<paths.metrics>/preprocess_skipped.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lfdm.config import Params
from lfdm.data import FrameStore, ManifestRow, sample_frame_indices, write_manifest
from lfdm.data.clips import Skip
from lfdm.data.datasets import iter_dataset

SKIPPED_FILE = "preprocess_skipped.json"


def run(p: Params) -> dict[str, float]:
    rng = np.random.default_rng(p.seed)
    store = FrameStore(p.paths.frames, mode="w")
    rows: list[ManifestRow] = []
    skipped: list[Skip] = []
    for clip in tqdm(iter_dataset(p.data, p.seed, skipped.append), desc="preprocess", unit="clip"):
        store.write(clip.video_id, clip.frames)
        indices = sample_frame_indices(len(clip.frames), p.data.num_frames, p.data.frame_sampling, rng)
        rows.append(
            ManifestRow(
                video_id=clip.video_id,
                label=clip.label,
                subject=clip.subject,
                split=clip.split,
                num_frames=len(clip.frames),
                source=clip.source,
                frame_indices=indices.tolist(),
            )
        )
    report = Path(p.paths.metrics) / SKIPPED_FILE
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        json.dumps({"count": len(skipped), "skipped": [asdict(s) for s in skipped]}, indent=2) + "\n"
    )
    splits = [r.split for r in rows]
    for split in ("train", "test"):
        if split not in splits:
            raise ValueError(
                f"data.dataset={p.data.dataset}: no usable {split} clips ({len(rows)} read, {len(skipped)} "
                f"skipped: see {report}); every stage after preprocess needs both train and test clips"
            )
    write_manifest(p.paths.manifest, rows)
    return {
        "videos": len(rows),
        "train_videos": splits.count("train"),
        "test_videos": splits.count("test"),
        "labels": len({r.label for r in rows}),
        "subjects": len({r.subject for r in rows}),
        "skipped_videos": len(skipped),
    }
