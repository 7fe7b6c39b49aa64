"""Frame-level Fréchet distances: ``fid_i3d`` (the main one) and ``fid_mobilenetv2``.

Standard FID uses the TF-Inception pool3 features, whose weights no package ships offline. Two offline
networks stand in, each reported under its own name so nobody mistakes it for FID (values are not
comparable with published FID numbers):

- ``fid_i3d``: Kinetics-400 I3D (an Inception-v1 inflated from ImageNet weights, the FVD network) as an image
  network (:func:`lfdm.metrics.i3d.still_frame_i3d`: each frame held still); features: the 1024-d global
  average of its last feature map, the layer FID takes from Inception-v3. No part of lfdm trains against it.
- ``fid_mobilenetv2``: ImageNet MobileNetV2; features: the 1280-d global average of the last feature map.
  The LFAE's perceptual loss (default backbone) and ``finetune_decoder`` train against these very weights,
  so a model can score well on it by optimisation alone: a secondary column.

Protocol: frames ``(N, 3, H, W)`` or ``(N, H, W, 3)``, uint8 or float in [0, 1]; resized to 224² (bilinear,
antialiased), then each network's input range (I3D: [-1, 1]; MobileNetV2: ImageNet-normalised).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfdm.losses import IMAGENET_MEAN, IMAGENET_STD, fold_batch_norms, load_imagenet_model
from lfdm.metrics.i3d import I3D, load_i3d, still_frame_i3d

INPUT_SIZE = 224


Frames = torch.Tensor | np.ndarray


class FrameFeatures(nn.Module, ABC):
    """Frames → ``(N, D)`` float64 pooled features, ``batch_size`` at a time; the distance is
    :func:`lfdm.metrics.fvd.feature_frechet_distance` of two such sets. Subclasses give :meth:`embed`."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    @abstractmethod
    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 224, 224)`` float in [0, 1] on the model's device → ``(B, D)``."""

    def preprocess(self, frames: Frames) -> torch.Tensor:
        x = torch.as_tensor(frames).to(next(self.parameters()).device)
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
            raise ValueError(f"frames must be (N, 3, H, W) or (N, H, W, 3), got {tuple(x.shape)}")
        if x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.float() / 255
        elif not x.is_floating_point() or x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError(
                f"frames must be uint8 or float in [0, 1], got {x.dtype} in [{x.min()}, {x.max()}]"
            )
        return F.interpolate(
            x.float(), (INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False
        )

    @torch.inference_mode()
    def forward(self, frames: Frames | Iterable[Frames]) -> np.ndarray:
        batches = [frames] if isinstance(frames, (torch.Tensor, np.ndarray)) else frames
        out = [
            self.embed(self.preprocess(chunk)).double().cpu().numpy()
            for batch in batches
            for chunk in torch.as_tensor(batch).split(self.batch_size)
        ]
        if not out:
            raise ValueError("no frames")
        return np.concatenate(out)


class MobileNetFeatures(FrameFeatures):
    """Frames → ``(N, 1280)`` pooled ImageNet MobileNetV2 features (``fid_mobilenetv2``)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, weights: str | None = None, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        # inference only: batch norms folded into the convolutions, channels-last for oneDNN — together 3.7×
        # faster on the CPU, features equal to 1e-5
        trunk = cast(nn.Sequential, load_imagenet_model("mobilenet_v2", weights).features)
        features = fold_batch_norms(trunk.eval())
        self.features = features.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        x = ((frames - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.features(x).mean(dim=(2, 3))


class I3DFrameFeatures(FrameFeatures):
    """Frames → ``(N, 1024)`` pooled features of the I3D held still (``fid_i3d``): about 0.03 s a frame on 2 CPU
    cores, 2–3× MobileNetV2's."""

    def __init__(self, model: I3D | None = None, batch_size: int = 32) -> None:
        super().__init__(batch_size)
        self.network = still_frame_i3d(load_i3d() if model is None else model)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        clips = (frames * 2 - 1).permute(0, 2, 3, 1)[:, None]  # one-frame clips (B, 1, 224, 224, 3)
        return self.network.trunk(clips).mean(dim=(2, 3, 4))
