"""DM training steps/s: flows read from the Zarr store (ours) vs flows computed by the LFAE inside the
loop (the official design, which runs F on every clip of every batch).

    python benchmarks/dm_data.py                  # default params, 20 timed steps per design
    python benchmarks/dm_data.py --steps 10 --threads 1
    python benchmarks/dm_data.py --precision auto --profile 10   # + where a store-fed step goes, by operator

Both designs train the same diffusion model at the default sizes on real embedded clips, with
randomly initialised networks (speed does not depend on the weights): ``zarr`` runs ``extract_flow``'s
work once beforehand (not timed, as in the pipeline) and trains from ``FlowSequenceDataset`` through a
DataLoader; ``in-loop`` reads the K frames of each clip and runs F (under ``inference_mode``) and Φ for
z0 before every step. A benchmark, not a test: it prints figures and the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from lfdm.config import Precision, load_params
from lfdm.data import FlowSequenceDataset, FlowStore, FlowStoreAttrs, ManifestRow, generate_clips, to_tensor
from lfdm.data.frames import sample_frame_indices
from lfdm.device import autocast
from lfdm.diffusion import FlowDiffusion
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.unet3d import Unet3D
from lfdm.models.warp import to_diffusion_tensor
from lfdm.training import BatchStream, adam

TEXT_DIM = 384


def flows_of(lfae: LatentFlowAutoEncoder, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``clips (B, K, 3, H, W)`` → diffusion tensors ``(B, 3, K, h, w)`` and z0 ``(B, C, h, w)``."""
    b, k = clips.shape[:2]
    motion = lfae.flow_predictor(clips[:, :1].expand_as(clips).flatten(0, 1), clips.flatten(0, 1))
    x0 = to_diffusion_tensor(motion.flow.unflatten(0, (b, k)), motion.occlusion.unflatten(0, (b, k)))
    return x0, lfae.encode(clips[:, 0]).latent


def timed(step, batches, steps: int, warmup: int = 2) -> list[float]:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(next(batches))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--precision", default="fp32", choices=get_args(Precision), help="as params.yaml's precision"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="STEPS", help="profile this many store-fed steps"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    k, batch_size = p.data.num_frames, p.train_dm.batch_size
    print(
        f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}"
    )

    rng = np.random.default_rng(0)
    clips = [c for c in generate_clips(p.data, p.seed) if c.split == "train"][: 4 * batch_size]
    videos = torch.stack(
        [
            to_tensor(c.frames[sample_frame_indices(len(c.frames), k, p.data.frame_sampling, rng)])
            for c in clips
        ]
    )  # (N, K, 3, H, W)
    lfae = LatentFlowAutoEncoder(p.lfae).eval()
    h = p.data.image_size // 4
    diffusion = FlowDiffusion(
        Unet3D(p.dm.unet, cond_channels=p.lfae.latent_channels, text_dim=TEXT_DIM, latent_size=h),
        p.dm.diffusion,
    ).train()
    optimizer = adam(diffusion.parameters(), p.train_dm.lr, p.train_dm.betas)
    text = torch.randn(TEXT_DIM)

    def dm_step(x0: torch.Tensor, z0: torch.Tensor) -> None:
        with autocast(torch.device("cpu"), args.precision):
            loss = diffusion(x0, z0, text.expand(len(x0), -1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as work:
        store = FlowStore(
            Path(work) / "flows.zarr",
            "w",
            FlowStoreAttrs(
                num_frames=k,
                latent_size=h,
                latent_channels=p.lfae.latent_channels,
                lfae_checkpoint="",
                lfae_sha256="",
            ),
        )
        rows = []
        with torch.inference_mode():
            for i, clip in enumerate(clips):
                x0, z0 = flows_of(lfae, videos[i : i + 1])
                store.write(clip.video_id, x0[0].numpy(), z0[0].numpy())
                rows.append(
                    ManifestRow(clip.video_id, clip.label, clip.subject, "train", k, "", tuple(range(k)))
                )
        dataset = FlowSequenceDataset(store.path, rows, {clip.label: text for clip in clips})
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
        zarr_batches = BatchStream(loader)
        zarr_times = timed(lambda b: dm_step(b["x0"], b["z0"]), zarr_batches, args.steps)
        if args.profile:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                timed(lambda b: dm_step(b["x0"], b["z0"]), zarr_batches, args.profile, warmup=0)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    def in_loop(indices: torch.Tensor) -> None:
        with torch.inference_mode():
            x0, z0 = flows_of(lfae, videos[indices])
        dm_step(x0.clone(), z0.clone())  # leave inference mode's tensors for autograd

    index_batches = iter(lambda: torch.randint(len(videos), (batch_size,)), None)
    loop_times = timed(in_loop, index_batches, args.steps)

    zarr_s, loop_s = statistics.median(zarr_times), statistics.median(loop_times)
    print(
        f"shape: batch {batch_size}, K {k}, {p.data.image_size}² frames, latent {h}² × {p.lfae.latent_channels}"
    )
    print("| design | s/step (median) | steps/s |")
    print("|---|---|---|")
    print(f"| flows from the Zarr store (ours) | {zarr_s:.3f} | {1 / zarr_s:.2f} |")
    print(f"| LFAE inside the loop (official) | {loop_s:.3f} | {1 / loop_s:.2f} |")
    print(f"speed-up: {loop_s / zarr_s:.2f}x")


if __name__ == "__main__":
    main()
