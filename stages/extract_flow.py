"""extract_flow: the trained flow predictor F on (x0, x_i) for every clip → latent flow + occlusion
sequences and z0 in a Zarr store. ``train_dm`` reads only this store: the LFAE never runs in its loop."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from lfdm.config import Params
from lfdm.data import FlowStore, FlowStoreAttrs, FrameStore, ManifestRow, read_manifest, to_tensor
from lfdm.device import autocast, resolve_device
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
    )
    FlowStore(p.paths.flows, "w", attrs)
    map_shards(functools.partial(extract_shard, p), batch_shards(rows, p.extract_flow.batch_size, shards))
    return {"clips": len(rows), "latent_size": attrs.latent_size, "latent_channels": attrs.latent_channels}


def extract_shard(p: Params, batches: Sequence[tuple[int, Sequence[ManifestRow]]]) -> None:
    """F on (x0, x_i) for the clips of ``batches`` → their sequences and z0 in the flow store."""
    device = resolve_device(p.device)
    lfae, _ = load_lfae(p.paths.lfae, device)
    frames, store = FrameStore(p.paths.frames), FlowStore(p.paths.flows, "r+")
    with (
        torch.inference_mode(),
        tqdm(total=sum(len(b) for _, b in batches), desc="extract_flow", unit="clip") as bar,
    ):
        for _, batch in batches:
            clips = torch.stack(
                [to_tensor(frames.read(row.video_id, row.frame_indices)) for row in batch]
            ).to(device)
            b, k = clips.shape[:2]  # (B, K, 3, H, W)
            driving = clips.flatten(0, 1)
            source = clips[:, :1].expand_as(clips).flatten(0, 1)  # every frame against its clip's x0
            with autocast(device, p.precision):
                flow = lfae.flow_predictor(source, driving)
                z0 = lfae.encode(clips[:, 0]).latent.float()
            sequences = to_diffusion_tensor(
                flow.flow.float().unflatten(0, (b, k)), flow.occlusion.float().unflatten(0, (b, k))
            )  # (B, 3, K, h, w)
            for row, seq, latent in zip(batch, sequences.cpu(), z0.cpu(), strict=True):
                store.write(row.video_id, seq.numpy(), latent.numpy())
            bar.update(b)
