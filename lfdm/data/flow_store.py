"""The Zarr v3 store written by ``extract_flow`` and read by ``train_dm``.

Layout: ``flows/<video_id>`` ``(3, K, h, w)`` — the diffusion tensor of
:func:`lfdm.models.warp.to_diffusion_tensor` (grid x, grid y, 2·occlusion − 1); ``z0/<video_id>``
``(C, h, w)`` — the LFAE latent of the clip's first frame; group attributes :class:`FlowStoreAttrs`.
One chunk per array: a training sample always reads the whole of both.

Stored as float16: the flow channels live in [-1, 1], where float16 steps are ≤ 2⁻¹¹ (about 0.01 px
of a 32 px latent), far below the diffusion noise the DM is trained to remove; z0 keeps 3 significant
digits. That halves disk and read time; z0 (C·h·w) outweighs the flows, so it matters. Writers of
different videos never touch the same file, so extract_flow may run in parallel processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch.utils.data import Dataset

from lfdm.data.frames import LazyZarrGroup, check_video_id
from lfdm.data.manifest import ManifestRow


@dataclass(frozen=True)
class FlowStoreAttrs:
    num_frames: int  # K
    latent_size: int  # h = w
    latent_channels: int  # C
    lfae_checkpoint: str  # path of the LFAE checkpoint the flows come from
    lfae_sha256: str  # its content hash


class FlowStore(LazyZarrGroup):
    """``FlowStore(path, "w", attrs)`` creates a store; ``FlowStore(path)`` reads one."""

    kind = "flow store"

    def __init__(
        self, path: str | Path, mode: Literal["r", "r+", "w", "w-"] = "r", attrs: FlowStoreAttrs | None = None
    ) -> None:
        creating = mode in ("w", "w-")
        if creating != (attrs is not None):
            raise ValueError(
                f"flow store {path}: attrs are required with mode 'w'/'w-' and only then (mode={mode!r})"
            )
        super().__init__(path, mode)
        if attrs is not None:
            self.group.attrs.update(asdict(attrs))
            self.group.create_group("flows")
            self.group.create_group("z0")

    @property
    def attrs(self) -> FlowStoreAttrs:
        stored: dict[str, Any] = self.group.attrs.asdict()  # JSON, as __init__ wrote it from FlowStoreAttrs
        try:
            return FlowStoreAttrs(**{f.name: stored[f.name] for f in fields(FlowStoreAttrs)})
        except KeyError as err:
            raise ValueError(f"{self.path} is not a flow store: attribute {err} is missing") from None

    def write(self, video_id: str, flow: np.ndarray | torch.Tensor, z0: np.ndarray | torch.Tensor) -> None:
        """``flow (3, K, h, w)``, ``z0 (C, h, w)``; both are checked against :attr:`attrs` before writing."""
        a = self.attrs
        check_video_id(video_id)
        arrays = {}
        for name, x, shape in (
            ("flows", flow, (3, a.num_frames, a.latent_size, a.latent_size)),
            ("z0", z0, (a.latent_channels, a.latent_size, a.latent_size)),
        ):
            x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if x.shape != shape:
                raise ValueError(f"{video_id}: {name} must have shape {shape}, got {tuple(x.shape)}")
            with np.errstate(over="ignore"):  # reported below, with the video id
                arrays[name] = x.astype(np.float16)
            if not np.isfinite(arrays[name]).all():
                raise ValueError(f"{video_id}: {name} has values that are not finite in float16")
        for name, x in arrays.items():
            self.forget(f"{name}/{video_id}")
            arr = self.subgroup(name).create_array(
                video_id, shape=x.shape, dtype=x.dtype, chunks=x.shape, overwrite=True
            )
            arr[...] = x

    def read(self, video_id: str, dtype: DTypeLike = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """``(flow (3, K, h, w), z0 (C, h, w))`` as ``dtype`` (float16 is how they are stored)."""
        flow, z0 = (self.read_array(f"{name}/{video_id}", video_id) for name in ("flows", "z0"))
        return flow.astype(dtype, copy=False), z0.astype(dtype, copy=False)  # fresh reads: no second copy

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and video_id in self.subgroup("flows")

    @property
    def video_ids(self) -> list[str]:
        return sorted(self.subgroup("flows").array_keys())


# training sets up to this size (as stored, float16) are read into memory once: a read from Zarr costs
# 3–4 ms per sample on the training process (its event-loop thread competes with torch's), 5 % of a
# default CPU training step; larger sets stream from the store
PRELOAD_MAX_BYTES = 512 << 20


class FlowSequenceDataset(Dataset):
    """Diffusion training samples. Item: ``{"x0": (3, K, h, w) float32, "z0": (C, h, w) float32,
    "text": (D,) float32, "video_id": str}``. Sets of up to ``PRELOAD_MAX_BYTES`` are held in memory
    (``preloaded``); otherwise the store opens lazily, once per DataLoader worker."""

    def __init__(
        self,
        store_path: str | Path,
        rows: Sequence[ManifestRow],
        label_embeddings: Mapping[str, torch.Tensor],
    ) -> None:
        labels = {r.label for r in rows}
        missing = sorted(labels - set(label_embeddings))
        if missing:
            raise ValueError(f"no text embedding for label(s) {missing}")
        self.store = FlowStore(store_path, "r")
        self.rows = list(rows)
        self.text = {label: torch.as_tensor(label_embeddings[label], dtype=torch.float32) for label in labels}
        a = self.store.attrs
        values_per_clip = a.latent_size**2 * (3 * a.num_frames + a.latent_channels)
        stored_bytes = len(self.rows) * values_per_clip * np.dtype(np.float16).itemsize
        self.preloaded = (
            [self.store.read(r.video_id, np.float16) for r in self.rows]
            if stored_bytes <= PRELOAD_MAX_BYTES
            else None
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        flow, z0 = self.preloaded[index] if self.preloaded is not None else self.store.read(row.video_id)
        return {
            "x0": torch.from_numpy(flow.astype(np.float32, copy=False)),
            "z0": torch.from_numpy(z0.astype(np.float32, copy=False)),
            "text": self.text[row.label],
            "video_id": row.video_id,
        }
