"""extract_flow: the trained flow predictor F on (x0, x_i) for every clip → latent flow + occlusion
sequences and z0 in a Zarr store. ``train_dm`` reads only this store: the LFAE never runs in its loop.

With ``extract_flow.draws`` = D > 1, each training clip also gets D − 1 other draws: its K frames drawn again
(``data.frame_sampling``) and colour-jittered clip-wide (:func:`lfdm.data.jitter_colours`), as the official
loaders do at every load — stored once here instead. A clip's draws depend only on ``seed`` and its id, so the
store is the same however the clips are split into shards.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lfdm.config import Params
from lfdm.data import (
    FlowStore,
    FlowStoreAttrs,
    FrameStore,
    ManifestRow,
    jitter_colours,
    read_manifest,
    sample_frame_indices,
    to_tensor,
)
from lfdm.device import autocast, resolve_device
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.lfae_checkpoints import load_lfae
from lfdm.models.warp import to_diffusion_tensor
from lfdm.shards import MapShards, batch_shards, serial


def run(p: Params, shards: int = 1, map_shards: MapShards = serial) -> dict[str, float]:
    """Create the flow store, then fill it shard by shard (each shard writes its own clips)."""
    lfae, meta = load_lfae(p.paths.lfae, torch.device("cpu"))
    rows = read_manifest(p.paths.manifest)
    attrs = FlowStoreAttrs(
        num_frames=p.data.num_frames,
        latent_size=meta["image_size"] // 4,
        latent_channels=lfae.cfg.latent_channels,
        lfae_checkpoint=p.paths.lfae,
        lfae_sha256=hashlib.sha256(Path(p.paths.lfae).read_bytes()).hexdigest(),
        draws=p.extract_flow.draws,
    )
    FlowStore(p.paths.flows, "w", attrs)
    map_shards(functools.partial(extract_shard, p), batch_shards(rows, p.extract_flow.batch_size, shards))
    redrawn = sum(row.split == "train" for row in rows) * (attrs.draws - 1)
    return {
        "clips": len(rows),
        "sequences": len(rows) + redrawn,
        "latent_size": attrs.latent_size,
        "latent_channels": attrs.latent_channels,
    }


def extract_shard(p: Params, batches: Sequence[tuple[int, Sequence[ManifestRow]]]) -> None:
    """F on (x0, x_i) for the clips of ``batches`` → their sequences and z0 in the flow store."""
    device = resolve_device(p.device)
    lfae, _ = load_lfae(p.paths.lfae, device)
    frames, store = FrameStore(p.paths.frames), FlowStore(p.paths.flows, "r+")
    sequences = functools.partial(flow_sequences, lfae, device=device, precision=p.precision)
    extra = p.extract_flow.draws - 1
    with (
        torch.inference_mode(),
        tqdm(total=sum(len(b) for _, b in batches), desc="extract_flow", unit="clip") as bar,
    ):
        for _, batch in batches:
            clips = torch.stack([to_tensor(frames.read(row.video_id, row.frame_indices)) for row in batch])
            for row, flow, z0 in zip(batch, *sequences(clips), strict=True):
                store.write(row.video_id, flow, z0)
            for row in (row for row in batch if extra and row.split == "train"):
                store.write_redraws(row.video_id, *sequences(redraws(p, frames, row, extra)))
            bar.update(len(batch))


def flow_sequences(
    lfae: LatentFlowAutoEncoder, clips: torch.Tensor, *, device: torch.device, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``(B, K, 3, H, W)`` in [0, 1] → diffusion tensors ``(B, 3, K, h, w)`` and z0 ``(B, C, h, w)``, on
    the CPU, F run on every frame against its clip's x0."""
    clips = clips.to(device)
    b, k = clips.shape[:2]
    driving = clips.flatten(0, 1)
    source = clips[:, :1].expand_as(clips).flatten(0, 1)
    with autocast(device, precision):
        flow = lfae.flow_predictor(source, driving)
        z0 = lfae.encode(clips[:, 0]).latent.float()
    sequences = to_diffusion_tensor(
        flow.flow.float().unflatten(0, (b, k)), flow.occlusion.float().unflatten(0, (b, k))
    )
    return sequences.cpu(), z0.cpu()


def redraws(p: Params, frames: FrameStore, row: ManifestRow, count: int) -> torch.Tensor:
    """``count`` other draws of clip ``row`` ``(count, K, 3, H, W)``: frames drawn again, colours jittered."""
    rng = np.random.default_rng([p.seed, zlib.crc32(row.video_id.encode())])
    clips = []
    for _ in range(count):
        indices = sample_frame_indices(row.num_frames, p.data.num_frames, p.data.frame_sampling, rng)
        clips.append(jitter_colours(to_tensor(frames.read(row.video_id, indices)), rng))
    return torch.stack(clips)
