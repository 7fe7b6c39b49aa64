"""Condition accuracy: does a generated video move the way its label says?

A small video classifier is trained on the real training clips of a dataset; its accuracy on the real
test clips is the ceiling, its accuracy on the generated test videos (labelled with the condition they
were generated from) is the metric. Videos: ``(N, K, 3, H, W)`` (as lfdm generates them) or
``(N, K, H, W, 3)``, uint8 in [0, 255] or float in [0, 1], K ≥ 2 frames of which the first is the
conditioning image, H and W divisible by 8 (the classifier halves them three times).

The classifier sees every frame beside its difference to frame 0, so the motion, not the subject's
appearance, decides; it keeps a coarse spatial grid before the linear head because zoom and rotation
differ only in *where* things move which way. Training uses no augmentation: a horizontal flip would
swap "pan left" and "pan right" (and rotation directions).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lfdm.device import resolve_device

Videos = torch.Tensor | np.ndarray


def _block(c_in: int, c_out: int, frames_kernel: int) -> nn.Sequential:
    """Conv3d halving H and W (kernel ``frames_kernel`` along time, K kept) + GroupNorm + SiLU."""
    conv = nn.Conv3d(c_in, c_out, (frames_kernel, 3, 3), (1, 2, 2), (frames_kernel // 2, 1, 1))
    return nn.Sequential(conv, nn.GroupNorm(8, c_out), nn.SiLU())


class MotionClassifier(nn.Module):
    """Videos ``(B, K, 3, H, W)`` float in [0, 1] → logits ``(B, num_classes)``; ~80k parameters."""

    def __init__(self, num_classes: int, width: int = 32, grid: int = 4) -> None:
        super().__init__()
        # first layer per frame (cheap at full resolution), then mixing across time
        self.features = nn.Sequential(
            _block(6, width // 2, 1), _block(width // 2, width, 3), _block(width, width * 2, 3)
        )
        self.pool = nn.AdaptiveAvgPool3d((1, grid, grid))  # time averaged, a grid×grid layout kept
        self.head = nn.Linear(width * 2 * grid * grid, num_classes)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = torch.cat((videos * 2 - 1, videos - videos[:, :1]), dim=2)  # (B, K, 6, H, W)
        return self.head(self.pool(self.features(x.transpose(1, 2))).flatten(1))


def as_videos(videos: Videos) -> torch.Tensor:
    """A video set (module doc) → ``(N, K, 3, H, W)`` on the CPU, dtype kept (uint8, or float in [0, 1])."""
    x = torch.as_tensor(np.ascontiguousarray(videos) if isinstance(videos, np.ndarray) else videos).cpu()
    if x.ndim != 5 or 3 not in (x.shape[-1], x.shape[2]):
        raise ValueError(f"videos must be (N, K, H, W, 3) or (N, K, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-1] == 3:
        x = x.permute(0, 1, 4, 2, 3)
    if len(x) == 0 or x.shape[1] < 2 or x.shape[-1] % 8 or x.shape[-2] % 8:
        raise ValueError(f"need N ≥ 1 videos, K ≥ 2 frames, H and W divisible by 8; got {tuple(x.shape)}")
    if x.is_floating_point():
        low, high = x.min().item(), x.max().item()
        if low < -1e-3 or high > 1 + 1e-3:  # e.g. videos in [-1, 1] or [0, 255] as float
            raise ValueError(f"float videos must be in [0, 1], got values in [{low:.3g}, {high:.3g}]")
    elif x.dtype != torch.uint8:
        raise ValueError(f"videos must be uint8 or floating point, got {x.dtype}")
    return x


def _to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device)
    return batch.float() / 255 if batch.dtype == torch.uint8 else batch.float().clamp(0, 1)


def _targets(classes: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"labels not among the classifier's classes {list(classes)}: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[label] for label in labels])


def train_classifier(
    videos: Videos,
    labels: Sequence[str],
    *,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> tuple[MotionClassifier, list[str]]:
    """Train on real clips (``labels[i]`` of ``videos[i]``) → the model in eval mode and its sorted classes.

    Cross-entropy, AdamW, ``steps`` batches drawn epoch by epoch from a ``seed``-ed permutation; the set
    stays on the CPU in its own dtype and each batch is copied to ``device``.
    """
    x, device = as_videos(videos), resolve_device(str(device))
    if len(labels) != len(x):
        raise ValueError(f"need one label per video: {len(x)} videos, {len(labels)} labels")
    classes = sorted(set(labels))
    y = _targets(classes, labels)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        model = MotionClassifier(len(classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in tqdm(range(steps), desc="condition classifier", leave=False):
        if len(order) < batch_size:  # a fresh permutation per epoch; the remainder starts the next one
            order = torch.cat((order, torch.randperm(len(x), generator=generator)))
        index, order = order[:batch_size], order[batch_size:]
        loss = nn.functional.cross_entropy(model(_to_float(x[index], device)), y[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), classes


@torch.inference_mode()
def predict(
    model: MotionClassifier, classes: Sequence[str], videos: Videos, batch_size: int = 32
) -> list[str]:
    """The predicted class name of every video."""
    x, device = as_videos(videos), next(model.parameters()).device
    predicted = [model(_to_float(batch, device)).argmax(1).cpu() for batch in x.split(batch_size)]
    indices: list[int] = torch.cat(predicted).tolist()
    return [classes[i] for i in indices]


class UnscoredLabelWarning(UserWarning):
    """Videos left out of the condition accuracy: their label has no training clip to learn it from."""


def accuracy(model: MotionClassifier, classes: Sequence[str], videos: Videos, labels: Sequence[str]) -> float:
    """Fraction of videos classified as their label (the condition accuracy for generated videos).

    A label the classifier was not trained on (no training clip has it) cannot be recognised, so its videos
    are left out, with a warning naming the labels; NaN when no video is left."""
    if len(labels) != len(videos):
        raise ValueError(f"need one label per video: {len(videos)} videos, {len(labels)} labels")
    scored = [i for i, label in enumerate(labels) if label in classes]
    if skipped := sorted(set(labels) - set(classes)):
        warnings.warn(
            f"condition accuracy leaves out {len(labels) - len(scored)} of {len(labels)} videos: no training clip "
            f"has their label(s) {skipped}, so the classifier never learnt them",
            UnscoredLabelWarning,
            stacklevel=2,
        )
    if not scored:
        return float("nan")
    predicted = predict(model, classes, videos[scored])
    return float(np.mean([p == labels[i] for p, i in zip(predicted, scored, strict=True)]))
