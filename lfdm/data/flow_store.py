"""The Zarr v3 store written by ``extract_flow`` and read by ``train_dm``.

Layout: ``flows/<video_id>`` ``(3, K, h, w)`` — the diffusion tensor of
:func:`lfdm.models.warp.to_diffusion_tensor` (grid x, grid y, 2·occlusion − 1) of the manifest's frames;
``z0/<video_id>`` ``(C, h, w)`` — the LFAE latent of the clip's first frame; group attributes
:class:`FlowStoreAttrs`. With ``draws`` = D > 1, a training clip also has ``redrawn_flows/<video_id>``
``(D − 1, 3, K, h, w)`` and ``redrawn_z0/<video_id>`` ``(D − 1, C, h, w)``: the same from other draws of its
frames, colour-jittered (``extract_flow``). One chunk per draw: a training sample reads one draw whole.

Stored as float16: the flow channels live in [-1, 1], where float16 steps are ≤ 2⁻¹¹ (about 0.01 px
of a 32 px latent), far below the diffusion noise the DM is trained to remove; z0 keeps 3 significant
digits. That halves disk and read time; z0 (C·h·w) outweighs the flows, so it matters. Writers of
different videos never touch the same file, so extract_flow may run in parallel processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch.utils.data import Dataset

from lfdm.data.frames import PRELOAD_MAX_BYTES, LazyZarrGroup, check_video_id
from lfdm.data.manifest import ManifestRow

Array = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class FlowStoreAttrs:
    num_frames: int  # K
    latent_size: int  # h = w
    latent_channels: int  # C
    lfae_checkpoint: str  # path of the LFAE checkpoint the flows come from
    lfae_sha256: str  # its content hash
    draws: int = 1  # sequences per training clip: the manifest's frames, then D − 1 redrawn and jittered


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
            for name in ("flows", "z0") + (("redrawn_flows", "redrawn_z0") if attrs.draws > 1 else ()):
                self.group.create_group(name)

    @property
    def attrs(self) -> FlowStoreAttrs:
        stored: dict[str, Any] = self.group.attrs.asdict()  # JSON, as __init__ wrote it from FlowStoreAttrs
        for f in fields(FlowStoreAttrs):
            if f.name not in stored and f.default is MISSING:  # attributes with a default came later
                raise ValueError(f"{self.path} is not a flow store: attribute {f.name!r} is missing")
        return FlowStoreAttrs(**{f.name: stored[f.name] for f in fields(FlowStoreAttrs) if f.name in stored})

    def write(self, video_id: str, flow: Array, z0: Array) -> None:
        """``flow (3, K, h, w)``, ``z0 (C, h, w)``; both are checked against :attr:`attrs` before writing."""
        a = self.attrs
        self._write(
            video_id,
            {
                "flows": (flow, (3, a.num_frames, a.latent_size, a.latent_size)),
                "z0": (z0, (a.latent_channels, a.latent_size, a.latent_size)),
            },
        )

    def write_redraws(self, video_id: str, flows: Array, z0: Array) -> None:
        """A training clip's other draws: ``flows (D − 1, 3, K, h, w)``, ``z0 (D − 1, C, h, w)``."""
        a = self.attrs
        if a.draws < 2:
            raise ValueError(f"{self.path} holds one draw per clip (attribute draws = {a.draws})")
        self._write(
            video_id,
            {
                "redrawn_flows": (flows, (a.draws - 1, 3, a.num_frames, a.latent_size, a.latent_size)),
                "redrawn_z0": (z0, (a.draws - 1, a.latent_channels, a.latent_size, a.latent_size)),
            },
        )

    def _write(self, video_id: str, arrays: dict[str, tuple[Array, tuple[int, ...]]]) -> None:
        check_video_id(video_id)
        checked = {}
        for name, (x, shape) in arrays.items():
            x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if x.shape != shape:
                raise ValueError(f"{video_id}: {name} must have shape {shape}, got {tuple(x.shape)}")
            with np.errstate(over="ignore"):  # reported below, with the video id
                checked[name] = x.astype(np.float16)
            if not np.isfinite(checked[name]).all():
                raise ValueError(f"{video_id}: {name} has values that are not finite in float16")
        for name, x in checked.items():
            self.forget(f"{name}/{video_id}")
            chunks = x.shape if name in ("flows", "z0") else (1, *x.shape[1:])  # redraws: a chunk per draw
            arr = self.subgroup(name).create_array(
                video_id, shape=x.shape, dtype=x.dtype, chunks=chunks, overwrite=True
            )
            arr[...] = x

    def read(
        self, video_id: str, dtype: DTypeLike = np.float32, draw: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(flow (3, K, h, w), z0 (C, h, w))`` of draw ``draw`` (0: the manifest's frames) as ``dtype``
        (float16 is how they are stored)."""
        if draw == 0:
            flow, z0 = (self.read_array(f"{name}/{video_id}", video_id) for name in ("flows", "z0"))
        elif 0 < draw < self.draws_of(video_id):
            flow, z0 = (
                np.asarray(self.array(f"redrawn_{name}/{video_id}", video_id)[draw - 1])
                for name in ("flows", "z0")
            )
        else:
            raise IndexError(
                f"{self.path}: video {video_id!r} has {self.draws_of(video_id)} draw(s), not {draw + 1}"
            )
        return flow.astype(dtype, copy=False), z0.astype(dtype, copy=False)  # fresh reads: no second copy

    def draws_of(self, video_id: str) -> int:
        """How many draws of ``video_id`` the store holds: D for a training clip, 1 for the others (read off
        the array's shape: its handle stays open, so a training read costs no metadata lookup)."""
        try:
            return 1 + self.array(f"redrawn_flows/{video_id}", video_id).shape[0]
        except KeyError:  # no redraws of this clip (or none in the store)
            return 1

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and video_id in self.subgroup("flows")

    @property
    def video_ids(self) -> list[str]:
        return sorted(self.subgroup("flows").array_keys())


class FlowSequenceDataset(Dataset):
    """Diffusion training samples, one per clip (a random one of its draws). Item: ``{"x0": (3, K, h, w)
    float32, "z0": (C, h, w) float32, "text": (D,) float32, "video_id": str}``. Sets of up to
    ``PRELOAD_MAX_BYTES`` are held in memory (``preloaded``); otherwise the store opens lazily, once per
    DataLoader worker."""

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
        self.draws = [self.store.draws_of(r.video_id) for r in self.rows]
        values_per_draw = a.latent_size**2 * (3 * a.num_frames + a.latent_channels)
        stored_bytes = sum(self.draws) * values_per_draw * np.dtype(np.float16).itemsize
        self.preloaded = (
            [
                [self.store.read(r.video_id, np.float16, d) for d in range(n)]
                for r, n in zip(self.rows, self.draws, strict=True)
            ]
            if stored_bytes <= PRELOAD_MAX_BYTES
            else None
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """A sample of clip ``index``, its draw picked at random (torch's generator) where it has several."""
        draws = self.draws[index]
        return self.item(index, int(torch.randint(draws, ())) if draws > 1 else 0)

    def item(self, index: int, draw: int = 0) -> dict[str, Any]:
        """Clip ``index``'s draw ``draw`` (0: the manifest's frames)."""
        row = self.rows[index]
        flow, z0 = (
            self.preloaded[index][draw]
            if self.preloaded is not None
            else self.store.read(row.video_id, draw=draw)
        )
        return {
            "x0": torch.from_numpy(flow.astype(np.float32, copy=False)),
            "z0": torch.from_numpy(z0.astype(np.float32, copy=False)),
            "text": self.text[row.label],
            "video_id": row.video_id,
        }
