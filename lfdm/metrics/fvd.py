"""Fréchet Video Distance (Unterthiner et al., 2018) and LFDM's class/subject-conditional cFVD and sFVD.

Protocol (StyleGAN-V's ``compute_fvd`` with ``rescale=True, resize=True``, the Unterthiner recipe):

* videos: ``(N, T, H, W, 3)`` (as the reference code) or ``(N, T, 3, H, W)`` (as lfdm generates them),
  uint8 in [0, 255] or float in [0, 1]; every frame goes in: T is not resampled.
* frames resized to 224×224 with ``F.interpolate(mode="bilinear", antialias=True)``, then mapped to
  [-1, 1] (the I3D input range);
* features: the 400 Kinetics-400 logits of RGB I3D (:mod:`lfdm.metrics.i3d`, before the softmax),
  float64; statistics are the mean and the unbiased covariance (``np.cov``);
* distance: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the trace of the root from scipy's symmetric
  eigensolver (:func:`frechet_distance`).

The paper (Sec. 4.1/4.2) samples 10,000 videos of 40 frames at 128² (64² for the 64-pixel models) and
resizes the real videos to the generated volume first, so real and fake must share T and H×W. Its
author used StyleGAN-V's TorchScript I3D with ``resize=False`` (LFDM issue #27), so the official numbers'
preprocessing is ambiguous; 224² is what I3D was trained on and what StyleGAN-V's own metric uses.
cFVD / sFVD: FVD within each class label / each conditioning subject image, then mean ± std over groups.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from lfdm.metrics.i3d import I3D, INPUT_SIZE, load_i3d

Videos = torch.Tensor | np.ndarray
# a whole set of videos, or an iterable of batches of them (a DataLoader, a generator over files)
VideoSet = Videos | Iterable[Videos]
FeatureExtractor = Callable[[VideoSet], np.ndarray]
Groups = Sequence[Hashable] | np.ndarray  # one group id per video


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, D)``, N ≥ 2 → mean ``(D,)`` and unbiased covariance ``(D, D)``, float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features (N ≥ 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means ``(D,)``, covariances ``(D, D)``.

    ``‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½``, with tr (Σ₁Σ₂)^½ taken as the sum of the square roots of
    the eigenvalues of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (the same eigenvalues as Σ₁Σ₂). Unlike
    ``scipy.linalg.sqrtm(Σ₁Σ₂)`` (pytorch-fid), this stays real and exact for the rank-deficient covariances
    of a few videos in 400 dimensions (cFVD / sFVD groups), where sqrtm returns spurious imaginary parts.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    eigenvalues = scipy.linalg.eigvalsh((product + product.T) / 2)
    trace_covmean = np.sqrt(eigenvalues.clip(min=0)).sum()  # round-off makes null eigenvalues slightly < 0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (eigenvalues below 0 by round-off count as 0)."""
    eigenvalues, vectors = scipy.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T


class I3DFeatures:
    """Videos → I3D Kinetics-400 logits ``(N, 400)`` float64, the FVD features (protocol: module doc).

    Videos are processed ``batch_size`` at a time on the device of ``model`` (move it with
    ``I3DFeatures(load_i3d().to(device))``); each batch is copied there, so a set may live on the CPU.
    """

    def __init__(self, model: I3D | None = None, batch_size: int = 8) -> None:
        self.model = load_i3d() if model is None else model.eval()
        self.batch_size = batch_size

    def preprocess(self, videos: Videos) -> torch.Tensor:
        """One batch, layout and range as in the module doc → ``(B, T, 224, 224, 3)`` float32 in [-1, 1]."""
        x = torch.as_tensor(videos).to(next(self.model.parameters()).device)
        if x.ndim != 5 or 3 not in (x.shape[-1], x.shape[2]):
            raise ValueError(f"videos must be (N, T, H, W, 3) or (N, T, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-1] == 3:
            x = x.permute(0, 1, 4, 2, 3)  # → (N, T, 3, H, W) for the resize
        if x.dtype == torch.uint8:
            x = x.float() / 255
        elif x.is_floating_point():
            low, high = x.min().item(), x.max().item()
            if low < -1e-3 or high > 1 + 1e-3:  # e.g. videos already in [-1, 1]: would silently skew FVD
                raise ValueError(f"float videos must be in [0, 1], got values in [{low:.3g}, {high:.3g}]")
            x = x.float().clamp(0, 1)
        else:
            raise TypeError(f"videos must be uint8 or floating point, got {x.dtype}")
        n, t = x.shape[:2]
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            size = (INPUT_SIZE, INPUT_SIZE)
            x = F.interpolate(x.flatten(0, 1), size, mode="bilinear", antialias=True, align_corners=False)
            x = x.unflatten(0, (n, t))
        return (x * 2 - 1).permute(0, 1, 3, 4, 2)

    @torch.inference_mode()
    def __call__(self, videos: VideoSet) -> np.ndarray:
        batches = [videos] if isinstance(videos, (torch.Tensor, np.ndarray)) else videos
        features = [
            self.model(self.preprocess(chunk)).double().cpu().numpy()
            for batch in batches
            for chunk in torch.as_tensor(batch).split(self.batch_size)
        ]
        if not features:
            raise ValueError("no videos")
        return np.concatenate(features)


def feature_frechet_distance(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    """Fréchet distance between two feature sets ``(N_real, D)`` and ``(N_fake, D)`` (FVD on I3D features)."""
    return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features))


def fvd(real_videos: VideoSet, fake_videos: VideoSet, extractor: FeatureExtractor) -> float:
    """FVD between two video sets (see the module doc for layout and range), e.g. ``extractor=I3DFeatures()``."""
    return feature_frechet_distance(extractor(real_videos), extractor(fake_videos))


def group_fvds(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    real_groups: Groups,
    fake_groups: Groups,
) -> dict[Hashable, float]:
    """FVD within each group (class label for cFVD, subject image for sFVD): ``{group: fvd}``.

    ``*_groups[i]`` is the group of ``*_features[i]``; both sides must hold the same groups, ≥ 2 videos each.
    """
    real_ids, fake_ids = np.asarray(real_groups), np.asarray(fake_groups)
    if len(real_ids) != len(real_features) or len(fake_ids) != len(fake_features):
        raise ValueError("need one group per video on each side")
    real_set, fake_set = set(real_ids.tolist()), set(fake_ids.tolist())
    if real_set != fake_set:
        raise ValueError(
            f"groups only among real videos: {sorted(map(str, real_set - fake_set))}, "
            f"only among fake videos: {sorted(map(str, fake_set - real_set))}"
        )
    return {
        group: feature_frechet_distance(real_features[real_ids == group], fake_features[fake_ids == group])
        for group in sorted(real_set, key=str)
    }


def grouped_fvd(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    real_groups: Groups,
    fake_groups: Groups,
) -> tuple[float, float]:
    """cFVD / sFVD: mean and (population) standard deviation of :func:`group_fvds` over the groups."""
    values = np.array(list(group_fvds(real_features, fake_features, real_groups, fake_groups).values()))
    return float(values.mean()), float(values.std())
