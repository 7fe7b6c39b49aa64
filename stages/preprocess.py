"""preprocess: the selected dataset → cropped/resized frames (Zarr) + a Parquet manifest.

Every clip keeps all its frames (the LFAE trains on frame pairs from anywhere in a clip) and records the
K time-sorted frame indices that the diffusion model sees (``data.frame_sampling``).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from lfdm.config import Params
from lfdm.data import FrameStore, ManifestRow, sample_frame_indices, write_manifest
from lfdm.data.datasets import iter_dataset


def run(p: Params) -> dict[str, float]:
    rng = np.random.default_rng(p.seed)
    store = FrameStore(p.paths.frames, mode="w")
    rows: list[ManifestRow] = []
    for clip in tqdm(iter_dataset(p.data, p.seed), desc="preprocess", unit="clip"):
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
    write_manifest(p.paths.manifest, rows)
    splits = [r.split for r in rows]
    return {
        "videos": len(rows),
        "train_videos": splits.count("train"),
        "test_videos": splits.count("test"),
        "labels": len({r.label for r in rows}),
        "subjects": len({r.subject for r in rows}),
    }
