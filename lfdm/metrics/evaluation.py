"""The evaluation protocol shared by the ``evaluate_references`` and ``evaluate`` stages.

The real test clips and the two reference methods (``static``: x0 repeated; ``oracle``: the LFAE decoding
the flow extracted from the real clip) do not depend on the diffusion model. ``evaluate_references``
scores them once and saves what scoring a generated set needs as :class:`References` (the real clips'
I3D and MobileNetV2 features, the trained condition classifier); ``evaluate`` then only extracts the
generated videos' features, so a new diffusion model or sampler costs the half of the evaluation that
concerns it. Metric definitions: ``stages/evaluate.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F

from lfdm.data import FrameStore, ManifestRow
from lfdm.errors import MissingInput
from lfdm.metrics.classifier import MotionClassifier
from lfdm.metrics.fid import FrameFeatures, I3DFrameFeatures, MobileNetFeatures
from lfdm.metrics.fvd import feature_frechet_distance, grouped_fvd
from lfdm.metrics.i3d import I3D

METHODS = ("lfdm", "static", "oracle")
REFERENCE_METHODS = ("static", "oracle")
# metric → the frame features it uses (frames 1..K−1 of each video: (N·(K−1), D))
FRAME_METRICS = {"fid_i3d": "i3d_frames", "fid_mobilenetv2": "mobilenet"}
# the features a video set is scored on: I3D logits per video (N, 400), then the frame features
FEATURES = ("i3d", *FRAME_METRICS.values())


def frame_extractors(i3d: I3D, device: torch.device) -> dict[str, FrameFeatures]:
    """The frame feature extractors of :data:`FRAME_METRICS`, by feature key (``i3d``: FVD's network)."""
    return {"i3d_frames": I3DFrameFeatures(i3d).to(device), "mobilenet": MobileNetFeatures().to(device)}


def method_metrics(
    method: str,
    real: dict[str, np.ndarray],
    fake: dict[str, np.ndarray],
    l1: torch.Tensor,
    labels: Sequence[str],
    subjects: Sequence[str],
) -> dict[str, float]:
    """FVD, cFVD, sFVD (``*_std``: spread over groups), ``fid_i3d``, ``fid_mobilenetv2`` and L1 of one method,
    from the :data:`FEATURES` of the real and the method's videos and its per-frame L1 ``(N, K−1)``."""
    metrics = {f"fvd/{method}": feature_frechet_distance(real["i3d"], fake["i3d"])}
    for key, groups in (("cfvd", labels), ("sfvd", subjects)):
        keep = _in_groups_of_two(groups)  # a covariance needs two videos; tiny test sets lack them
        if keep.any():
            kept = np.asarray(groups)[keep]
            mean, std = grouped_fvd(real["i3d"][keep], fake["i3d"][keep], kept, kept)
            metrics[f"{key}/{method}"], metrics[f"{key}_std/{method}"] = mean, std
    for key, features in FRAME_METRICS.items():
        metrics[f"{key}/{method}"] = feature_frechet_distance(real[features], fake[features])
    metrics[f"l1/{method}"] = float(l1.mean())
    return metrics


@dataclass
class References:
    """What ``evaluate_references`` saves for ``evaluate``: per real test clip (``video_ids``, in manifest
    order) its :data:`FEATURES`; the reference methods' per-frame L1 ``(N, K−1)``; the condition classifier,
    its classes and input size; the references' metrics."""

    video_ids: list[str]
    real: dict[str, np.ndarray]
    l1: dict[str, torch.Tensor]
    classifier: MotionClassifier
    classes: list[str]
    classifier_size: int  # the frame side the classifier was trained on
    metrics: dict[str, float]

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "video_ids": self.video_ids,
                "real": {k: torch.from_numpy(v) for k, v in self.real.items()},
                "l1": self.l1,
                "classifier": self.classifier.state_dict(),
                "classes": self.classes,
                "classifier_size": self.classifier_size,
                "metrics": self.metrics,
            },
            path,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        video_ids: Sequence[str],
        frames: int,
        classifier_size: int,
        device: torch.device,
    ) -> References:
        """Load ``path`` and check it was made for the test clips ``video_ids`` of ``frames`` frames and a
        classifier that sees ``classifier_size``² frames (what ``evaluate`` will score against it)."""
        redo = "run `dvc repro evaluate_references`"
        if not Path(path).is_file():
            raise MissingInput(f"{path}: no evaluation references; {redo}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        made_for = {
            "features": sorted(saved["real"]),
            "test clips": saved["video_ids"],
            "frames": next(iter(saved["l1"].values())).shape[1] + 1,
            "evaluate.classifier_size": saved["classifier_size"],
        }
        wanted = {
            "features": sorted(FEATURES),
            "test clips": list(video_ids),
            "frames": frames,
            "evaluate.classifier_size": classifier_size,
        }
        if differ := [key for key in made_for if made_for[key] != wanted[key]]:
            shown = {
                key: (made_for[key], wanted[key])
                if key != "test clips"
                else (f"{len(made_for[key])} clips", f"{len(wanted[key])} clips")
                for key in differ
            }
            raise ValueError(f"{path} was made for other inputs (saved, now): {shown}; {redo}")
        classifier = MotionClassifier(len(saved["classes"]))
        classifier.load_state_dict(saved["classifier"])
        return cls(
            saved["video_ids"],
            {k: v.numpy() for k, v in saved["real"].items()},
            saved["l1"],
            classifier.to(device).eval(),
            saved["classes"],
            saved["classifier_size"],
            saved["metrics"],
        )


@overload
def concatenated(parts: Sequence[torch.Tensor]) -> torch.Tensor: ...
@overload
def concatenated(parts: Sequence[np.ndarray]) -> np.ndarray: ...
def concatenated(parts: Sequence[Any]) -> torch.Tensor | np.ndarray:
    """Shards' results, in shard order, as one tensor or array."""
    return torch.cat(list(parts)) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def stored_frames(store: FrameStore, row: ManifestRow | str) -> torch.Tensor:
    """A clip's K frames (a manifest row) or a whole stored video (an id) as uint8 ``(K, 3, H, W)``."""
    frames = store.read(row) if isinstance(row, str) else store.read(row.video_id, row.frame_indices)
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


def downsized(videos: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, K, 3, H, W)`` → float ``(N, K, 3, size, size)`` in [0, 1] (antialiased), the classifier's input."""
    x = videos.flatten(0, 1).float() / 255
    if x.shape[-1] != size:
        x = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x.unflatten(0, videos.shape[:2])


def per_frame_l1(videos: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel error per video and frame, frame 0 (the given image) excluded: ``(N, K−1)``."""
    return (videos.float() / 255 - real.float() / 255).abs().mean(dim=(2, 3, 4))[:, 1:]


def _in_groups_of_two(groups: Sequence[str]) -> np.ndarray:
    values, counts = np.unique(groups, return_counts=True)
    return np.isin(groups, values[counts >= 2])
