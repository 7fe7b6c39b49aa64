"""Datasets, the embedded default dataset, the Parquet manifest and the Zarr frame/flow stores."""

from lfdm.data.embedded import MOTIONS, Clip, generate_clips
from lfdm.data.flow_store import FlowSequenceDataset, FlowStore, FlowStoreAttrs
from lfdm.data.frames import FramePairDataset, FrameStore, jitter_colours, sample_frame_indices, to_tensor
from lfdm.data.manifest import ManifestRow, read_manifest, write_manifest

__all__ = [
    "MOTIONS",
    "Clip",
    "FlowSequenceDataset",
    "FlowStore",
    "FlowStoreAttrs",
    "FramePairDataset",
    "FrameStore",
    "ManifestRow",
    "generate_clips",
    "jitter_colours",
    "read_manifest",
    "sample_frame_indices",
    "to_tensor",
    "write_manifest",
]
