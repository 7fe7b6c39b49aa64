"""evaluate_references: the half of the evaluation that does not depend on the diffusion model, run once per
LFAE and test set — the real test clips' features, the two reference methods ``static`` (x0 repeated) and
``oracle`` (the LFAE decoding the flow extracted from the real clip), and the condition classifier trained on
the real training clips. Its metrics (``fvd/static``, ``accuracy/real``, ...) are those of ``evaluate``'s
table for these rows (stages/evaluate.py); ``paths.references`` keeps what scoring generated videos needs
(:class:`lfdm.metrics.evaluation.References`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lfdm.config import Params
from lfdm.data import FlowStore, FrameStore, ManifestRow, read_manifest
from lfdm.device import resolve_device
from lfdm.metrics import I3DFeatures, load_i3d
from lfdm.metrics.classifier import accuracy, train_classifier
from lfdm.metrics.evaluation import (
    FEATURES,
    REFERENCE_METHODS,
    References,
    concatenated,
    downsized,
    frame_extractors,
    method_metrics,
    per_frame_l1,
    stored_frames,
)
from lfdm.models.lfae_checkpoints import load_lfae
from lfdm.models.warp import from_diffusion_tensor
from lfdm.shards import MapShards, batch_shards, serial
from lfdm.viz import to_uint8


@dataclass
class ShardResult:
    """Per video set (``"real"`` and each reference method) of one shard's clips, in their order."""

    features: dict[str, dict[str, np.ndarray]]  # FEATURES key → video set → its features
    l1: dict[str, torch.Tensor]  # reference method → (N, K−1)
    classifier_input: dict[str, torch.Tensor]  # (N, K, 3, s, s) in [0, 1]


def run(p: Params, shards: int = 1, map_shards: MapShards = serial) -> dict[str, float]:
    device, cfg = resolve_device(p.device), p.evaluate
    tests, train = (
        read_manifest(p.paths.manifest, split="test"),
        read_manifest(p.paths.manifest, split="train"),
    )
    parts = map_shards(functools.partial(reference_shard, p), batch_shards(tests, cfg.batch_size, shards))

    def features(name: str) -> dict[str, np.ndarray]:
        return {key: concatenated([part.features[key][name] for part in parts]) for key in FEATURES}

    real = features("real")
    l1 = {m: concatenated([part.l1[m] for part in parts]) for m in REFERENCE_METHODS}
    labels, subjects = [r.label for r in tests], [r.subject for r in tests]
    metrics: dict[str, float] = {}
    for m in REFERENCE_METHODS:
        metrics |= method_metrics(m, real, features(m), l1[m], labels, subjects)

    frames = FrameStore(p.paths.frames)
    classifier, classes = train_classifier(
        downsized(torch.stack([stored_frames(frames, r) for r in train]), cfg.classifier_size),
        [r.label for r in train],
        steps=cfg.classifier_steps,
        seed=p.seed,
        device=device,
    )
    for name in ("real", *REFERENCE_METHODS):
        videos = concatenated([part.classifier_input[name] for part in parts])
        metrics[f"accuracy/{name}"] = accuracy(classifier, classes, videos, labels)

    References(
        video_ids=[r.video_id for r in tests],
        real=real,
        l1=l1,
        classifier=classifier.cpu(),
        classes=classes,
        classifier_size=cfg.classifier_size,
        metrics=metrics,
    ).save(p.paths.references)
    return metrics


def reference_shard(p: Params, batches: list[tuple[int, list[ManifestRow]]]) -> ShardResult:
    device, cfg = resolve_device(p.device), p.evaluate
    videos = reference_videos(p, [row for _, batch in batches for row in batch], device)
    i3d = load_i3d().to(device)
    clips = I3DFeatures(i3d, batch_size=cfg.batch_size)
    features = {
        "i3d": {
            name: clips(tqdm(v.split(cfg.batch_size), desc=f"I3D {name}", leave=False))
            for name, v in videos.items()
        }
    }
    real = videos["real"]
    for key, extractor in frame_extractors(i3d, device).items():
        features[key] = {
            "real": extractor(real[:, 1:].flatten(0, 1)),
            "oracle": extractor(videos["oracle"][:, 1:].flatten(0, 1)),
            # a static video's frames are all x0: one forward per video instead of K − 1
            "static": np.repeat(extractor(real[:, 0]), real.shape[1] - 1, axis=0),
        }
    return ShardResult(
        features=features,
        l1={m: per_frame_l1(videos[m], real) for m in REFERENCE_METHODS},
        classifier_input={name: downsized(v, cfg.classifier_size) for name, v in videos.items()},
    )


def reference_videos(p: Params, rows: list[ManifestRow], device: torch.device) -> dict[str, torch.Tensor]:
    """Real, static and oracle videos of the clips ``rows`` as uint8 ``(N, K, 3, H, W)``."""
    lfae, _ = load_lfae(p.paths.lfae, device)
    frames, flows = FrameStore(p.paths.frames), FlowStore(p.paths.flows)
    videos: dict[str, list[torch.Tensor]] = {"real": [], "static": [], "oracle": []}
    with torch.inference_mode():
        for row in tqdm(rows, desc="evaluate_references: oracle", unit="clip"):
            truth = stored_frames(frames, row)
            flow, _ = flows.read(row.video_id)
            grid, occlusion = from_diffusion_tensor(torch.from_numpy(flow)[None].to(device))
            x0 = truth[:1].to(device).float() / 255
            oracle = lfae.decode(lfae.encode(x0), x0, grid[0], occlusion[0])
            videos["real"].append(truth)
            videos["static"].append(truth[:1].expand_as(truth))
            videos["oracle"].append(torch.from_numpy(to_uint8(oracle)).permute(0, 3, 1, 2))
    return {name: torch.stack(v) for name, v in videos.items()}
