"""evaluate: generated vs real test videos, beside two references on the same clips —
the static baseline (x0 repeated) and the oracle (the LFAE decoding the flow extracted from the real
video: the diffusion model's upper bound).

Metrics (pixel values in [0, 1], averaged per pixel, per frame and per video; frame 0 excluded, it is
the given image): ``l1/{lfdm,static,oracle}``; ``flow_cosine``: cosine between the mean latent
displacement trajectories of the generated and the real flow (does the video move the way the label
says); and per-frame L1 curves as a DVC plot. The FVD family arrives with the evaluation issue.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lfdm import tracking
from lfdm.config import Params
from lfdm.data import FlowStore, FrameStore, read_manifest, to_tensor
from lfdm.device import resolve_device
from lfdm.models.checkpoints import load_lfae
from lfdm.models.warp import from_diffusion_tensor, identity_grid
from lfdm.video import write_video
from lfdm.viz import to_uint8, video_grid


def mean_trajectory(x: torch.Tensor) -> torch.Tensor:
    """``(3, K, h, w)`` diffusion tensor → the mean displacement per frame, flattened ``(K·2,)``."""
    grid, _ = from_diffusion_tensor(x[None])
    h, w = grid.shape[2:4]
    return (grid[0] - identity_grid(h, w, dtype=grid.dtype)).mean(dim=(1, 2)).flatten()


def run(p: Params) -> dict[str, float]:
    device = resolve_device(p.device)
    lfae, _ = load_lfae(p.paths.lfae, device)
    samples_dir = Path(p.paths.samples)
    real, generated = FrameStore(p.paths.frames), FrameStore(samples_dir / "frames.zarr")
    real_flows, generated_flows = FlowStore(p.paths.flows), FlowStore(samples_dir / "flows.zarr")
    sample_of = {row.source: row for row in read_manifest(samples_dir / "manifest.parquet") if row.source == row.video_id}
    per_frame: dict[str, list[np.ndarray]] = {"lfdm": [], "static": [], "oracle": []}
    cosines, grid_videos = [], []
    with torch.inference_mode():
        for row in tqdm(read_manifest(p.paths.manifest, split="test"), desc="evaluate", unit="clip"):
            truth = to_tensor(real.read(row.video_id, row.frame_indices)).to(device)  # (K, 3, H, W)
            fake = to_tensor(generated.read(sample_of[row.video_id].video_id)).to(device)
            flow, _ = real_flows.read(row.video_id)
            grid, occlusion = from_diffusion_tensor(torch.from_numpy(flow)[None].to(device))
            features = lfae.encode(truth[:1])
            oracle = lfae.decode(features, truth[:1], grid[0], occlusion[0])
            for name, video in (("lfdm", fake), ("static", truth[:1].expand_as(truth)), ("oracle", oracle)):
                per_frame[name].append((video - truth).abs().mean(dim=(1, 2, 3))[1:].cpu().numpy())
            generated_flow, _ = generated_flows.read(sample_of[row.video_id].video_id)
            cosines.append(torch.nn.functional.cosine_similarity(
                mean_trajectory(torch.from_numpy(generated_flow)), mean_trajectory(torch.from_numpy(flow)), dim=0
            ).item())
            if len(grid_videos) < p.evaluate.max_grid_videos:
                grid_videos.append(np.concatenate([to_uint8(truth), to_uint8(fake)], axis=2))  # real | generated

    curves = {name: np.stack(values).mean(axis=0) for name, values in per_frame.items()}
    metrics = {f"l1/{name}": float(curve.mean()) for name, curve in curves.items()}
    metrics |= {"flow_cosine": float(np.mean(cosines)), "test_videos": len(cosines)}
    plot = Path(p.paths.plots) / "evaluate_l1_per_frame.json"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.write_text(json.dumps([
        {"frame": i + 1, **{name: float(curve[i]) for name, curve in curves.items()}}
        for i in range(len(curves["lfdm"]))
    ], indent=1))
    grid_path = Path(p.paths.plots) / "real_vs_generated.gif"
    write_video(grid_path, video_grid(grid_videos, columns=2, scale=2), fps=p.sample.fps)
    tracking.log_file(grid_path)
    return metrics
