"""evaluate: generated test videos against the real ones, beside two references on the same clips —
``static`` (x0 repeated: no motion at all) and ``oracle`` (the LFAE decoding the flow extracted from the
real video: the diffusion model's upper bound) — in one table.

Per method (``lfdm``, ``static``, ``oracle``), all against the real test videos (K frames, frame 0 is the
given image; protocols in docs/results.md):

- ``fvd/<m>``: FVD on Kinetics-400 I3D logits (:mod:`lfdm.metrics.fvd`); ``cfvd/<m>`` and ``sfvd/<m>``:
  FVD within each label / each subject image, mean over groups (``*_std`` the spread);
- ``accuracy/<m>``: condition accuracy, the share of videos a motion classifier trained on the real
  training clips assigns to their label; ``accuracy/real`` is its accuracy on the real test clips, the ceiling;
- ``fid_i3d/<m>``: Fréchet distance of frames 1..K−1 on the I3D's image features (each frame held still;
  not FID: :mod:`lfdm.metrics.fid`); ``fid_mobilenetv2/<m>`` the same on ImageNet MobileNetV2 features, which
  the LFAE's perceptual loss trains against (a secondary column);
- ``l1/<m>``: mean absolute pixel error per pixel, per frame and per video, frame 0 excluded;
- ``flow_cosine``: cosine between the mean latent displacement trajectories of generated and real flow;
- ``fvd_seen/lfdm`` vs ``fvd_unseen/lfdm`` (paper Table 2): FVD of videos generated from training images
  (``sample.seen_videos`` of them) and from as many test images.

The real clips' features, the ``static`` and ``oracle`` rows and the condition classifier come from the
``evaluate_references`` stage (``paths.references``), which runs again only when the LFAE, the test clips or
the ``evaluate`` params change; this stage extracts the generated videos' features.

Also written: ``<paths.metrics>/evaluate_table.md`` (the table), per-frame L1 curves and a real | generated
video grid (DVC plots), all logged to the MLflow run; under a tracked run the pipeline is then registered as
a new version of ``tracking.model_name`` (:func:`register`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lfdm import serving, tracking
from lfdm.config import Params
from lfdm.data import FlowStore, FrameStore, ManifestRow, read_manifest
from lfdm.device import resolve_device
from lfdm.metrics import I3DFeatures, feature_frechet_distance, load_i3d
from lfdm.metrics.classifier import accuracy
from lfdm.metrics.evaluation import (
    FRAME_METRICS,
    METHODS,
    References,
    concatenated,
    downsized,
    frame_extractors,
    method_metrics,
    per_frame_l1,
    stored_frames,
)
from lfdm.models.lfae_checkpoints import sampling_lfae_path
from lfdm.models.warp import from_diffusion_tensor, identity_grid
from lfdm.pipeline import LFDMPipeline, sampler_config
from lfdm.shards import MapShards, batch_shards, serial
from lfdm.video import write_video
from lfdm.viz import video_grid
from stages import HEADLINE


def mean_trajectory(x: torch.Tensor) -> torch.Tensor:
    """``(3, K, h, w)`` diffusion tensor → the mean displacement per frame, flattened ``(K·2,)``."""
    grid, _ = from_diffusion_tensor(x[None])
    h, w = grid.shape[2:4]
    return (grid[0] - identity_grid(h, w, dtype=grid.dtype)).mean(dim=(1, 2)).flatten()


@dataclass
class ShardResult:
    """What one shard of clips contributes; the lists and arrays follow the clips' order."""

    i3d: dict[str, np.ndarray]  # "lfdm" (and "real" for seen clips) → (N, 400) I3D logits
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # frame FEATURES of generated frames 1..K−1
    l1: torch.Tensor | None = None  # (N, K−1) per-frame L1 of the generated videos
    classifier_input: torch.Tensor | None = None  # (N, K, 3, s, s) in [0, 1]
    cosines: list[float] = field(default_factory=list)
    grid: torch.Tensor | None = None  # uint8 (n, K, 3, H, 2W): real | lfdm, the shard's first videos


def run(p: Params, shards: int = 1, map_shards: MapShards = serial) -> dict[str, float]:
    device, cfg = resolve_device(p.device), p.evaluate
    tests = read_manifest(p.paths.manifest, split="test")
    references = References.load(
        p.paths.references,
        video_ids=[r.video_id for r in tests],
        frames=len(tests[0].frame_indices),
        classifier_size=cfg.classifier_size,
        device=device,
    )
    generated_ids = {row.source for row in read_manifest(Path(p.paths.samples) / "manifest.parquet")}
    seen = [r for r in read_manifest(p.paths.manifest, split="train") if r.video_id in generated_ids]
    jobs = [("test", b) for b in batch_shards(tests, cfg.batch_size, shards)]
    if len(seen) >= 2:  # Table 2: FVD on training images (seen) beside as many test images (unseen)
        jobs += [("seen", b) for b in batch_shards(seen, cfg.batch_size, shards)]
    parts = map_shards(functools.partial(evaluate_shard, p), jobs)
    test = [part for (kind, _), part in zip(jobs, parts, strict=True) if kind == "test"]
    labels, subjects = [r.label for r in tests], [r.subject for r in tests]

    generated = {"i3d": concatenated([part.i3d["lfdm"] for part in test])} | {
        key: concatenated([part.frames[key] for part in test]) for key in FRAME_METRICS.values()
    }
    l1 = concatenated([part.l1 for part in test])
    metrics: dict[str, float] = {
        "test_videos": len(tests),
        "flow_cosine": float(np.mean([c for part in test for c in part.cosines])),
        **references.metrics,
        **method_metrics("lfdm", references.real, generated, l1, labels, subjects),
        "accuracy/lfdm": accuracy(
            references.classifier,
            references.classes,
            concatenated([part.classifier_input for part in test]),
            labels,
        ),
    }

    if seen_parts := [part for (kind, _), part in zip(jobs, parts, strict=True) if kind == "seen"]:
        unseen = np.linspace(0, len(tests) - 1, min(len(seen), len(tests))).round().astype(int)
        metrics["fvd_seen/lfdm"] = feature_frechet_distance(
            *(concatenated([part.i3d[name] for part in seen_parts]) for name in ("real", "lfdm"))
        )
        metrics["fvd_unseen/lfdm"] = feature_frechet_distance(
            references.real["i3d"][unseen], generated["i3d"][unseen]
        )
        metrics["seen_videos"] = len(seen)

    grid = torch.cat([part.grid for part in test])[: cfg.max_grid_videos]
    write_outputs(p, metrics, {"lfdm": l1, **references.l1}, grid)
    register(p, tests, metrics)
    return metrics


def evaluate_shard(p: Params, job: tuple[str, list[tuple[int, list[ManifestRow]]]]) -> ShardResult:
    """Features of one shard of generated test videos (``"test"``: everything the metrics need) or of
    training clips generated for the seen-vs-unseen FVD (``"seen"``: I3D features of real and generated)."""
    kind, batches = job
    device, cfg = resolve_device(p.device), p.evaluate
    rows = [row for _, batch in batches for row in batch]
    real, generated, cosines = collect_videos(p, rows)  # uint8 (N, K, 3, H, W)
    i3d = load_i3d().to(device)
    clips = I3DFeatures(i3d, batch_size=cfg.batch_size)
    videos = {"real": real, "lfdm": generated} if kind == "seen" else {"lfdm": generated}
    result = ShardResult(
        i3d={
            name: clips(tqdm(v.split(cfg.batch_size), desc=f"I3D {name}", leave=False))
            for name, v in videos.items()
        }
    )
    if kind == "seen":
        return result
    frames = generated[:, 1:].flatten(0, 1)
    result.frames = {key: e(frames) for key, e in frame_extractors(i3d, device).items()}
    result.l1 = per_frame_l1(generated, real)
    result.classifier_input = downsized(generated, cfg.classifier_size)
    result.cosines = cosines
    result.grid = torch.cat((real, generated), dim=-1)[: cfg.max_grid_videos]  # real | generated
    return result


def collect_videos(p: Params, rows: list[ManifestRow]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Real and generated videos of the clips ``rows`` as uint8 ``(N, K, 3, H, W)``, and the cosines between
    generated and real flow trajectories."""
    samples_dir = Path(p.paths.samples)
    real, generated = FrameStore(p.paths.frames), FrameStore(samples_dir / "frames.zarr")
    real_flows, generated_flows = FlowStore(p.paths.flows), FlowStore(samples_dir / "flows.zarr")
    sample_of = {
        row.source: row
        for row in read_manifest(samples_dir / "manifest.parquet")
        if row.source == row.video_id
    }
    real_videos, generated_videos, cosines = [], [], []
    for row in tqdm(rows, desc="evaluate: read", unit="clip"):
        generated_id = sample_of[row.video_id].video_id
        real_videos.append(stored_frames(real, row))
        generated_videos.append(stored_frames(generated, generated_id))
        (flow, _), (generated_flow, _) = real_flows.read(row.video_id), generated_flows.read(generated_id)
        cosines.append(
            F.cosine_similarity(
                mean_trajectory(torch.from_numpy(generated_flow)),
                mean_trajectory(torch.from_numpy(flow)),
                dim=0,
            ).item()
        )
    return torch.stack(real_videos), torch.stack(generated_videos), cosines


def write_outputs(
    p: Params, metrics: dict[str, float], per_frame: dict[str, torch.Tensor], pairs: torch.Tensor
) -> None:
    """Table, per-frame L1 curves and the real | generated grid of ``pairs`` (uint8 (n, K, 3, H, 2W))."""
    plots, metrics_dir = Path(p.paths.plots), Path(p.paths.metrics)
    plots.mkdir(parents=True, exist_ok=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    curves = {m: per_frame[m].mean(dim=0).tolist() for m in METHODS}
    (plots / "evaluate_l1_per_frame.json").write_text(
        json.dumps(
            [{"frame": i + 1, **{m: curves[m][i] for m in METHODS}} for i in range(len(curves["lfdm"]))],
            indent=1,
        )
    )
    table = metrics_dir / "evaluate_table.md"
    table.write_text(results_table(metrics))
    tracking.log_file(table)
    grid = list(pairs.permute(0, 1, 3, 4, 2).numpy())  # uint8 (K, H, 2W, 3) each
    grid_path = plots / "real_vs_generated.gif"
    write_video(grid_path, video_grid(grid, columns=2, scale=2), fps=p.sample.fps)
    tracking.log_file(grid_path)


def results_table(metrics: dict[str, float]) -> str:
    """The evaluate metrics as a Markdown table, one row per method."""

    def grouped(key: str, m: str) -> str:
        return (
            f"{metrics[f'{key}/{m}']:.1f} ± {metrics[f'{key}_std/{m}']:.1f}"
            if f"{key}/{m}" in metrics
            else "n/a"
        )

    rows = [
        "| method | FVD ↓ | cFVD ↓ | sFVD ↓ | accuracy ↑ | fid_i3d ↓ | fid_mobilenetv2 ↓ | L1 ↓ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rows.append(
            f"| {m} | {metrics[f'fvd/{m}']:.1f} | {grouped('cfvd', m)} | {grouped('sfvd', m)} "
            f"| {metrics[f'accuracy/{m}']:.3f} | {metrics[f'fid_i3d/{m}']:.3f} "
            f"| {metrics[f'fid_mobilenetv2/{m}']:.2f} | {metrics[f'l1/{m}']:.4f} |"
        )
    rows.append(f"| real (ceiling) | 0 | 0 | 0 | {metrics['accuracy/real']:.3f} | 0 | 0 | 0 |")
    notes = [
        f"{metrics['test_videos']} test videos; flow cosine (lfdm vs real) {metrics['flow_cosine']:.3f}."
    ]
    if "seen_videos" in metrics:
        notes.append(
            f"Seen vs unseen images ({metrics['seen_videos']} videos each): FVD {metrics['fvd_seen/lfdm']:.1f} "
            f"on training images, {metrics['fvd_unseen/lfdm']:.1f} on test images."
        )
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def register(p: Params, tests: list[ManifestRow], metrics: dict[str, float]) -> None:
    """The pipeline that made the samples, with the headline metrics, as a new version of
    ``tracking.model_name`` in the MLflow Model Registry (:func:`lfdm.serving.register`). Its test set is
    the digest of the test clips and their frames, which an unchanged ``evaluate_references`` keeps."""
    if not tracking.active_run_id():  # tracking off or down: not even the checkpoints are read
        return
    pipe = LFDMPipeline.from_checkpoints(
        sampling_lfae_path(p),
        p.paths.dm,
        p.paths.embeddings,
        p.text,
        torch.device("cpu"),
        sampler_config(p.sample),
    )
    clips = json.dumps([[row.video_id, list(row.frame_indices)] for row in tests])
    headline = {key: metrics[key] for key in HEADLINE if key in metrics}
    serving.register(pipe, headline, hashlib.sha256(clips.encode()).hexdigest(), p.tracking.model_name)
