"""A dataset → cropped/resized frames (Zarr) + a Parquet manifest: the body of ``preprocess``, also used
by ``finetune_decoder`` for its new-domain videos."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lfdm.config import DataConfig
from lfdm.data.clips import DatasetError, Skip
from lfdm.data.frames import FrameStore, sample_frame_indices
from lfdm.data.manifest import ManifestRow, write_manifest
from lfdm.data.sources import iter_dataset

MAX_NAMED = 10  # clips named in one warning


class TestOnlyLabelWarning(UserWarning):
    """Labels whose clips are all in the test split: nothing trains on them."""


class ShortClipWarning(UserWarning):
    """Clips with fewer frames than K: the diffusion model sees their last frame repeated."""


def prepare_dataset(
    cfg: DataConfig,
    seed: int,
    frames: str | Path,
    manifest: str | Path,
    skipped_report: str | Path,
    *,
    key: str = "data",
) -> dict[str, float]:
    """Read every clip of ``cfg.dataset``, write its frames and the manifest, list skipped clips with their
    reason in ``skipped_report`` (JSON), and return counts. Errors name the params section ``key``."""
    rng = np.random.default_rng(seed)
    store = FrameStore(frames, mode="w")
    rows: list[ManifestRow] = []
    skipped: list[Skip] = []
    for clip in tqdm(iter_dataset(cfg, seed, skipped.append), desc=f"{key}: {cfg.dataset}", unit="clip"):
        store.write(clip.video_id, clip.frames)
        indices = sample_frame_indices(len(clip.frames), cfg.num_frames, cfg.frame_sampling, rng)
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
    report = Path(skipped_report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        json.dumps({"count": len(skipped), "skipped": [asdict(s) for s in skipped]}, indent=2) + "\n"
    )
    splits = [r.split for r in rows]
    for split in ("train", "test"):
        if split not in splits:
            raise DatasetError(
                f"{key}.dataset={cfg.dataset}: no usable {split} clips ({len(rows)} read, {len(skipped)} "
                f"skipped: see {report}); the stages after it need both train and test clips"
            )
    write_manifest(manifest, rows)
    if test_only := sorted(
        {r.label for r in rows if r.split == "test"} - {r.label for r in rows if r.split == "train"}
    ):
        warnings.warn(
            f"{key}.dataset={cfg.dataset}: label(s) {test_only} have test clips but no training clip, so the diffusion "
            "model never learns them and the condition accuracy leaves their videos out; give some of their clips "
            "split 'train' (labels.csv) or add training clips",
            TestOnlyLabelWarning,
            stacklevel=2,
        )
    if short := [r for r in rows if r.num_frames < cfg.num_frames]:
        named = ", ".join(f"{r.video_id} ({r.num_frames})" for r in short[:MAX_NAMED])
        more = f" and {len(short) - MAX_NAMED} more" if len(short) > MAX_NAMED else ""
        warnings.warn(
            f"{key}.dataset={cfg.dataset}: {len(short)} clip(s) have fewer frames than {key}.num_frames="
            f"{cfg.num_frames}: {named}{more}; the diffusion model sees their last frame repeated (as the "
            f"official loaders do), as if the motion stopped; lower {key}.num_frames or leave these clips out",
            ShortClipWarning,
            stacklevel=2,
        )
    return {
        "videos": len(rows),
        "train_videos": splits.count("train"),
        "test_videos": splits.count("test"),
        "labels": len({r.label for r in rows}),
        "test_only_labels": len(test_only),
        "subjects": len({r.subject for r in rows}),
        "skipped_videos": len(skipped),
    }
