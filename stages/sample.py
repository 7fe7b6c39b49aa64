"""sample: every test clip's first frame × its own label (plus, for a few test images, each free-text
prompt in ``sample.extra_labels``, and ``sample.seen_videos`` training clips for the seen-vs-unseen
comparison) → a generated video and its latent flow.

Writes ``<paths.samples>/frames.zarr`` (videos, same layout as the preprocess frame store),
``flows.zarr`` (generated flow sequences), ``manifest.parquet`` (one row per sample; ``source`` is the
real clip it starts from) and a gif per sample."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from lfdm import tracking
from lfdm.config import Params
from lfdm.data import (
    FlowStore,
    FlowStoreAttrs,
    FrameStore,
    ManifestRow,
    read_manifest,
    to_tensor,
    write_manifest,
)
from lfdm.device import resolve_device
from lfdm.models.lfae_checkpoints import sampling_lfae_path
from lfdm.models.warp import from_diffusion_tensor, to_diffusion_tensor
from lfdm.pipeline import LFDMPipeline
from lfdm.shards import MapShards, batch_shards, serial
from lfdm.video import write_video
from lfdm.viz import flow_strip, to_uint8

MAX_LOGGED_GIFS = 8  # sample gifs attached to the MLflow run (all of them stay in paths.samples)


def plan(p: Params) -> list[ManifestRow]:
    """What to generate: one row per sample, ``source`` = the real test clip whose x0 is used."""
    tests = read_manifest(p.paths.manifest, split="test")
    train, n = read_manifest(p.paths.manifest, split="train"), p.sample.seen_videos
    seen = train[:: max(1, len(train) // n)][:n] if n else []  # spread over subjects and labels
    rows = [_sample_row(real, real.label, real.video_id) for real in tests + seen]
    firsts = list({real.subject: real for real in tests}.values())[: p.sample.extra_label_videos]
    for real, (i, prompt) in itertools.product(firsts, enumerate(p.sample.extra_labels)):
        rows.append(_sample_row(real, prompt, f"{real.subject}__prompt{i}"))
    return rows


def _sample_row(real: ManifestRow, label: str, sample_id: str) -> ManifestRow:
    return ManifestRow(
        video_id=sample_id,
        label=label,
        subject=real.subject,
        split=real.split,
        num_frames=len(real.frame_indices),
        source=real.video_id,
        frame_indices=tuple(range(len(real.frame_indices))),
    )


def run(p: Params, shards: int = 1, map_shards: MapShards = serial) -> dict[str, float]:
    """Create the sample stores, generate shard by shard, then write the manifest and log a few results."""
    out, rows, lfae = Path(p.paths.samples), plan(p), sampling_lfae_path(p)
    pipe = LFDMPipeline.from_checkpoints(lfae, p.paths.dm, None, p.text, torch.device("cpu"))  # its sizes
    FrameStore(out / "frames.zarr", "w")
    FlowStore(
        out / "flows.zarr",
        "w",
        FlowStoreAttrs(
            num_frames=pipe.num_frames,
            latent_size=pipe.image_size // 4,
            latent_channels=pipe.latent_channels,
            lfae_checkpoint=str(lfae),
            lfae_sha256="",
        ),
    )
    results = map_shards(functools.partial(sample_shard, p), batch_shards(rows, p.sample.batch_size, shards))
    write_manifest(out / "manifest.parquet", rows)
    for row in rows[:MAX_LOGGED_GIFS]:
        tracking.log_file(gif_path(p, row), "samples")
    last = rows[-1].video_id
    grid, _ = from_diffusion_tensor(torch.from_numpy(FlowStore(out / "flows.zarr").read(last)[0])[None])
    tracking.log_image(flow_strip(grid[0]), f"flow_{last}.png")  # the last sample's K flows
    seconds = sum(results)
    return {
        "videos": len(rows),
        "prompts": len(p.sample.extra_labels),
        "seconds_per_video": seconds / len(rows),
    }


def gif_path(p: Params, row: ManifestRow) -> Path:
    return Path(p.paths.samples) / "gifs" / f"{row.video_id}.gif"


def sample_shard(p: Params, batches: Sequence[tuple[int, Sequence[ManifestRow]]]) -> float:
    """Generate the samples of ``batches`` into the sample stores (and a gif each); returns the seconds
    spent generating. Batch i draws its noise from seed ``sample.seed + i``: the same for any sharding."""
    device = resolve_device(p.device)
    pipe = LFDMPipeline.from_checkpoints(
        sampling_lfae_path(p), p.paths.dm, p.paths.embeddings, p.text, device
    )
    real_frames = FrameStore(p.paths.frames)
    out = Path(p.paths.samples)
    videos, flows = FrameStore(out / "frames.zarr", "r+"), FlowStore(out / "flows.zarr", "r+")
    seconds = 0.0
    total = sum(len(b) for _, b in batches)
    with tqdm(total=total, desc=f"sample ({p.sample.sampler}-{p.sample.steps})", unit="video") as bar:
        for index, batch in batches:
            x0 = torch.stack([to_tensor(real_frames.read(r.source, r.frame_indices[:1]))[0] for r in batch])
            generator = torch.Generator(device).manual_seed(p.sample.seed + index)
            start = time.perf_counter()
            gen = pipe(
                x0, [r.label for r in batch], sampler=p.sample, generator=generator, precision=p.precision
            )
            frames = to_uint8(gen.videos)  # on the CPU: the GPU work is done
            seconds += time.perf_counter() - start
            sequences = to_diffusion_tensor(gen.flow, gen.occlusion).cpu().numpy()
            for row, video, seq, z0 in zip(batch, frames, sequences, gen.z0.cpu().numpy(), strict=True):
                videos.write(row.video_id, video)
                flows.write(row.video_id, seq, z0)
                write_video(gif_path(p, row), video, fps=p.sample.fps)
            bar.update(len(batch))
    return seconds
