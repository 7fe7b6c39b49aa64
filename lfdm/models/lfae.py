"""Stage one: the latent flow auto-encoder (LFAE), Sec. 3.2.1 of the paper, built as MRAA.

``encoder`` Φ maps an image ``(B, 3, H, W)`` in [0, 1] to a latent ``(B, 4C, H/4, W/4)``; ``flow_predictor``
F (MRAA: regions → sparse affine motions → dense flow) estimates the backward flow grid ``(B, h, w, 2)``
and occlusion map ``(B, 1, h, w)`` from a source to a driving frame at the latent resolution; ``decoder``
Ω renders the driving frame from the warped source latent. Flows follow :mod:`lfdm.models.warp`.

Region geometry (shifts, covariances, affines, sparse motions) is computed in fp32 with autocast off:
it is coordinate arithmetic where bf16's 8 mantissa bits would cost a sizeable fraction of a pixel.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfdm.config import LFAEConfig
from lfdm.models.warp import identity_grid, warp

LATENT_SCALE = 0.25  # the encoder's two down blocks
REGION_VAR = 0.01  # MRAA's isotropic heatmap variance, used when regions carry no covariance
REGION_VAR_FLOOR = 1e-6  # added to region covariances (a std of 0.001, ~1/130 latent pixel at 16²)
AFFINE_RIDGE = 1e-3  # fit_affine: weight of "no deformation" against the data, per unit of weight
ROBUST_ITERATIONS = 3  # robust_affine: reweighted least-squares rounds
# correlation: the local motion's mask logit starts this much above the others' (about 2/3 of every pixel
# among 12 motions); from an even start the masks often settle on the background affine and never learn
# the local motion's worth: on real footage F then left 0.82 of the static L1 instead of 0.69
LOCAL_MASK_PRIOR = 3.0
_EPS = 1e-12

Regions = dict[str, Tensor]


def _fp32(x: Tensor) -> torch.autocast:
    return torch.autocast(x.device.type, enabled=False)


def _resize(x: Tensor, size: torch.Size) -> Tensor:
    """Bilinear resize with the pixel-centre convention of :func:`warp` (align_corners=True)."""
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _expand_batch(x: Tensor, n: int) -> Tensor:
    if x.shape[0] not in (1, n):
        raise ValueError(f"cannot broadcast a batch of {x.shape[0]} to {n} flows")
    return x.expand(n, *x.shape[1:])


# ------------------------------------------------------------------------------------ building blocks


class SameBlock2d(nn.Sequential):
    """conv → BatchNorm → ReLU at constant resolution."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class DownBlock2d(nn.Sequential):
    """conv3×3 → BN → ReLU → AvgPool2: ``(B, Cin, H, W) → (B, Cout, H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(SameBlock2d(in_channels, out_channels), nn.AvgPool2d(2))


class UpBlock2d(nn.Sequential):
    """nearest ×2 → conv3×3 → BN → ReLU: ``(B, Cin, H, W) → (B, Cout, 2H, 2W)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), SameBlock2d(in_channels, out_channels))


class ResBlock2d(nn.Module):
    """Pre-activation residual block (BN → ReLU → conv) ×2, channels kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class AntiAliasDownsample(nn.Module):
    """Gaussian blur, then keep every ``1/scale``-th pixel (FOMM's AntiAliasInterpolation2d).

    ``(B, channels, H, W) → (B, channels, ⌈H·scale⌉, ⌈W·scale⌉)``; ``scale`` must be 1/n for an integer n.
    """

    kernel: Tensor

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.stride = round(1 / scale)
        if not math.isclose(self.stride * scale, 1.0):
            raise ValueError(f"scale must be 1/n for an integer n, got {scale}")
        sigma = (self.stride - 1) / 2
        size = 2 * round(sigma * 4) + 1
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        gauss = torch.exp(-(coords**2) / (2 * sigma**2)) if sigma > 0 else torch.ones(1)
        kernel = torch.outer(gauss, gauss) / gauss.sum() ** 2
        self.register_buffer("kernel", kernel.expand(channels, 1, size, size).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return x
        pad = self.kernel.shape[-1] // 2
        x = F.conv2d(F.pad(x, (pad,) * 4), self.kernel.to(x.dtype), groups=x.shape[1])
        return x[:, :, :: self.stride, :: self.stride]


class HourglassEncoder(nn.Module):
    """``num_blocks`` DownBlocks of width ``min(max_features, block_expansion·2^(i+1))``.

    Returns the input and every block's output, finest first: ``[x, (B, c1, H/2, W/2), ...]``.
    """

    def __init__(self, in_channels: int, *, block_expansion: int, num_blocks: int, max_features: int):
        super().__init__()
        self.widths = [in_channels] + [
            min(max_features, block_expansion * 2 ** (i + 1)) for i in range(num_blocks)
        ]
        self.blocks = nn.ModuleList(DownBlock2d(a, b) for a, b in itertools.pairwise(self.widths))
        self.out_channels = self.widths[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [x]
        for block in self.blocks:
            features.append(block(features[-1]))
        return features


class Hourglass(nn.Module):
    """U-Net with skip concatenation (FOMM/MRAA): ``(B, Cin, H, W) → (B, block_expansion + Cin, H, W)``.

    H and W must be divisible by ``2**num_blocks``.
    """

    def __init__(self, in_channels: int, *, block_expansion: int, num_blocks: int, max_features: int):
        super().__init__()
        self.encoder = HourglassEncoder(
            in_channels, block_expansion=block_expansion, num_blocks=num_blocks, max_features=max_features
        )
        widths = self.encoder.widths
        self.up_blocks = nn.ModuleList(
            # below the top, the input is the previous up block's output concatenated with an equal-width skip
            UpBlock2d(
                widths[i + 1] * (1 if i == num_blocks - 1 else 2), min(max_features, block_expansion * 2**i)
            )
            for i in reversed(range(num_blocks))
        )
        self.out_channels = block_expansion + in_channels

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        out = features.pop()
        for up in self.up_blocks:
            out = torch.cat((up(out), features.pop()), dim=1)
        return out


# ------------------------------------------------------------------------------ encoder and decoder


@dataclass
class EncoderOutput:
    """Φ's output. ``latent`` z: ``(B, 4C, H/4, W/4)``; ``skips``: features at full, 1/2 and 1/4 side
    ``((B, C, H, W), (B, 2C, H/2, W/2), (B, 4C, H/4, W/4))``, the last being ``latent`` itself."""

    latent: Tensor
    skips: tuple[Tensor, ...]

    def repeat_interleave(self, repeats: int) -> EncoderOutput:
        """Each sample ``repeats`` times in a row, ``B → B·repeats``: K frames of B clips decode in one call."""
        return EncoderOutput(
            latent=self.latent.repeat_interleave(repeats, 0),
            skips=tuple(s.repeat_interleave(repeats, 0) for s in self.skips),
        )


class Encoder(nn.Module):
    """Φ: SameBlock 7×7 (3→C), DownBlocks C→2C→4C. ``(B, 3, H, W) → EncoderOutput``."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.stem = SameBlock2d(3, channels, kernel_size=7)
        self.down_blocks = nn.ModuleList(
            [DownBlock2d(channels, 2 * channels), DownBlock2d(2 * channels, 4 * channels)]
        )

    def forward(self, image: Tensor) -> EncoderOutput:
        skips = [self.stem(image)]
        for block in self.down_blocks:
            skips.append(block(skips[-1]))
        return EncoderOutput(latent=skips[-1], skips=tuple(skips))


class Decoder(nn.Module):
    """Ω: ResBlocks at 4C, UpBlocks 4C→2C→C, 7×7 conv to RGB, sigmoid.

    ``skips=False`` is the paper's Ω(m ⊙ W(z0, f)) (Eq. 5). ``skips=True`` is the official code (MRAA's
    generator): besides the latent, the encoder features entering each up block and the final conv, and
    finally the source image, are warped and blended in as ``W(x, f)·m + previous·(1 − m)``.
    """

    def __init__(self, *, channels: int, res_blocks: int, skips: bool, padding: str = "zeros"):
        super().__init__()
        self.skips, self.padding = skips, padding
        self.bottleneck = nn.Sequential(*(ResBlock2d(4 * channels) for _ in range(res_blocks)))
        self.up_blocks = nn.ModuleList(
            [UpBlock2d(4 * channels, 2 * channels), UpBlock2d(2 * channels, channels)]
        )
        self.final = nn.Conv2d(channels, 3, 7, padding=3)

    def forward(
        self, features: EncoderOutput, source_image: Tensor, flow: Tensor, occlusion: Tensor
    ) -> Tensor:
        """``features`` of the source, ``source_image (B, 3, H, W)``, ``flow (B, h, w, 2)``,
        ``occlusion (B, 1, h, w)`` in [0, 1] (1 = visible), all with the same batch → ``(B, 3, H, W)``."""

        def blend(x: Tensor, previous: Tensor | None = None) -> Tensor:
            m = _resize(occlusion, x.shape[-2:])
            warped = warp(x, flow, self.padding) * m
            return warped if previous is None else warped + previous * (1 - m)

        out = self.bottleneck(blend(features.latent))
        for i, up in enumerate(self.up_blocks):
            out = up(blend(features.skips[-1 - i], out) if self.skips else out)
        if self.skips:
            out = blend(features.skips[0], out)
        out = torch.sigmoid(self.final(out))
        return blend(source_image, out) if self.skips else out


# ---------------------------------------------------------------------------------- region geometry


def covariance_to_affine(covar: Tensor) -> Tensor:
    """MRAA's region affine U·√S from the SVD of a symmetric PSD covariance, in closed form.

    ``covar (..., 2, 2) → (..., 2, 2)``. U is taken as the rotation whose first (major) axis has x ≥ 0,
    so the result is the same on every device and ``affine[..., 0, 0] ≥ 0`` (MRAA's sign convention);
    an isotropic covariance gets U = I with finite gradients.
    """
    a, b, d = covar[..., 0, 0], covar[..., 0, 1], covar[..., 1, 1]
    x, y = a - d, 2 * b
    r2 = x * x + y * y
    iso = r2 <= _EPS  # double `where`: keeps sqrt/atan2 gradients finite when the axes are undefined
    r = torch.where(iso, 0.0, torch.sqrt(torch.where(iso, 1.0, r2)))
    theta = 0.5 * torch.atan2(torch.where(iso, 0.0, y), torch.where(iso, 1.0, x))
    cos, sin = theta.cos(), theta.sin()
    rotation = torch.stack((cos, -sin, sin, cos), dim=-1).unflatten(-1, (2, 2))
    singular = torch.stack(((a + d + r) / 2, (a + d - r) / 2), dim=-1).clamp_min(_EPS)
    return rotation * singular.sqrt().unsqueeze(-2)  # scales the columns


def revert_axis_swap(affine: Tensor) -> Tensor:
    """Flip ``(..., 2, 2)`` affines whose [0, 0] entry is negative (MRAA): undoes the 180° turn a relative
    affine A_s·A_d⁻¹ picks up when one region's major axis wraps past ±90°."""
    return torch.where(affine[..., :1, :1] < 0, -affine, affine)


def region_gaussians(regions: Regions, grid: Tensor) -> Tensor:
    """exp(−½ (z−μ)ᵀ Σ⁻¹ (z−μ)) per region on ``grid (h, w, 2)`` → ``(B, K, h, w)``; Σ is the region
    covariance, or ``REGION_VAR``·I when the regions have none."""
    d = grid - regions["shift"][:, :, None, None]
    if "covar" in regions:
        q = torch.einsum("bkhwi,bkij,bkhwj->bkhw", d, torch.linalg.inv(regions["covar"]), d)
    else:
        q = d.square().sum(-1) / REGION_VAR
    return torch.exp(-0.5 * q)


def sparse_motions(source: Regions, driving: Regions, grid: Tensor, background: Tensor | None) -> Tensor:
    """Background + per-region backward grids ``(B, K+1, h, w, 2)`` on ``grid (h, w, 2)``.

    Region k: T_k(z) = A_s·A_d⁻¹·(z − μ_d) + μ_s (translation only without affines); background: the
    ``(B, 3, 3)`` affine applied to the identity grid, or the identity grid itself when None.
    """
    z = grid - driving["shift"][:, :, None, None]
    if "affine" in driving:
        relative = revert_axis_swap(source["affine"] @ torch.linalg.inv(driving["affine"]))
        z = torch.einsum("bkij,bkhwj->bkhwi", relative, z)
    regions = z + source["shift"][:, :, None, None]
    batch, (h, w) = regions.shape[0], grid.shape[:2]
    bg = (
        grid.expand(batch, h, w, 2)
        if background is None
        else F.affine_grid(
            background[:, :2], [batch, 1, h, w], align_corners=True
        )  # grid is align_corners=True
    )
    return torch.cat((bg.unsqueeze(1), regions), dim=1)


def fit_affine(flow: Tensor, weights: Tensor, ridge: float = AFFINE_RIDGE) -> Tensor:
    """Weighted least-squares affine maps of a backward grid: ``flow (B, h, w, 2)``, ``weights (B, M, h, w)``
    → ``(B, M, 2, 3)`` θ with ``θ·[z; 1] ≈ flow(z)`` (``F.affine_grid``'s form, align_corners=True).

    The linear part is pulled towards the identity by ``ridge`` × each map's weight, so a map over few or
    collinear pixels stays a well-posed translation rather than a singular fit."""
    h, w = flow.shape[1:3]
    with _fp32(flow):
        grid = identity_grid(h, w, device=flow.device).reshape(-1, 2)
        design = torch.cat((grid, torch.ones_like(grid[:, :1])), dim=1)  # (hw, 3)
        weights, flow = weights.float().flatten(2), flow.float().reshape(len(flow), -1, 2)
        normal = torch.einsum("bmn,ni,nj->bmij", weights, design, design)
        target = torch.einsum("bmn,ni,bnj->bmij", weights, design, flow)
        prior = ridge * weights.sum(-1)[..., None, None] * torch.diag(design.new_tensor([1.0, 1.0, 0.0]))
        eye = torch.eye(3, 2, device=flow.device)  # the identity map: A = I, t = 0
        theta = torch.linalg.solve(
            normal + prior + _EPS**0.5 * torch.eye(3, device=flow.device), target + prior @ eye
        )
    return theta.transpose(-1, -2)


def affine_motions(theta: Tensor, height: int, width: int) -> Tensor:
    """``(B, M, 2, 3)`` affine maps → their grids ``(B, M, h, w, 2)``."""
    b, m = theta.shape[:2]
    grids = F.affine_grid(theta.flatten(0, 1), [b * m, 1, height, width], align_corners=True)
    return grids.unflatten(0, (b, m))


def robust_affine(flow: Tensor, iterations: int = ROBUST_ITERATIONS) -> Tensor:
    """The dominant affine motion of ``flow (B, h, w, 2)``, ``(B, 1, 2, 3)``: least squares reweighted by a
    Cauchy function of each pixel's residual (scale: one latent pixel), so the minority motions (a face
    over a still background, a passing car) do not drag the fit."""
    h, w = flow.shape[1:3]
    weights = flow.new_ones(len(flow), 1, h, w)
    for _ in range(iterations):
        theta = fit_affine(flow, weights)
        residual = (affine_motions(theta, h, w)[:, 0] - flow).norm(dim=-1) * ((max(h, w) - 1) / 2)
        weights = (1 / (1 + residual.square())).detach()[:, None]
    return fit_affine(flow, weights)


# ---------------------------------------------------------------------------------- flow predictor


class CorrelationFlow(nn.Module):
    """Local motion from a cost volume (as PWC-Net and RAFT estimate flow): ``source, driving (B, 3, H, W)`` →
    the backward grid ``(B, H/4, W/4, 2)``.

    One encoder maps both frames to unit-length features at the latent size; every driving pixel's features
    are compared with the source's at each displacement within ``radius`` latent pixels; a softmax of these
    similarities (with a learnt temperature) averages the displacements — a soft arg-max, so motions come out
    sub-pixel. A small convolutional head then refines that motion, warp-and-refine as in PWC-Net: it sees the
    similarities, the motion, the driving features and the features of the source frame warped by that
    motion beside the driving frame at full size, which hold the sub-pixel residual the latent-size matching
    cannot resolve. Matching is what makes motion learnable in minutes: F need not regress it from pooled
    features (docs/model.md)."""

    shifts: Tensor

    def __init__(self, *, channels: int, radius: int):
        super().__init__()
        self.radius = radius
        self.encoder = nn.Sequential(
            SameBlock2d(3, channels // 2),
            DownBlock2d(channels // 2, channels),
            DownBlock2d(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.1)))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        self.register_buffer("shifts", torch.stack((dx, dy), dim=-1).reshape(-1, 2), persistent=False)
        # the source warped by the soft arg-max, the driving frame and their difference, down to the latent size
        self.residual = nn.Sequential(
            SameBlock2d(9, channels // 2),
            DownBlock2d(channels // 2, channels),
            DownBlock2d(channels, channels),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(len(self.shifts) + 2 + 2 * channels, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 2, 3, padding=1),
        )
        for param in self.refine[-1].parameters():  # weight and bias: starts as the plain soft arg-max
            nn.init.zeros_(param)

    def forward(self, source: Tensor, driving: Tensor) -> Tensor:
        b = len(source)
        features = F.normalize(self.encoder(torch.cat((source, driving))), dim=1)
        src, drv = features[:b], features[b:]
        h, w = src.shape[2:]
        # all pairs of pixels in one matmul (cheap at the latent size), then each driving pixel's window
        similarity = torch.bmm(drv.flatten(2).transpose(1, 2), src.flatten(2))  # (B, hw driving, hw source)
        window, inside = self._window(h, w, similarity.device)
        cost = similarity.gather(2, window.expand(b, -1, -1)).masked_fill(~inside, -1e4)  # (B, hw, shifts)
        with _fp32(cost):
            weights = F.softmax(cost.float() / self.log_temperature.exp(), dim=-1)
            pixels = (weights @ self.shifts).transpose(1, 2).unflatten(-1, (h, w))  # (B, 2, h, w)
        cost = cost.clamp_min(-1).transpose(1, 2).unflatten(-1, (h, w))
        scale = pixels.new_tensor([2 / (w - 1), 2 / (h - 1)])
        identity = identity_grid(h, w, device=pixels.device)
        # detached, as RAFT and PWC-Net warp: the refinement corrects the motion, not the matching through it
        warped = warp(source, identity + pixels.detach().permute(0, 2, 3, 1) * scale, padding="border")
        residual = self.residual(torch.cat((warped, driving, warped - driving), dim=1))
        refine_input = torch.cat((cost, pixels.to(cost.dtype), drv, residual.to(cost.dtype)), dim=1)
        pixels = pixels + self.refine(refine_input).float()
        return identity + pixels.permute(0, 2, 3, 1) * scale

    def _window(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """For each pixel and shift: the index of the source pixel it compares with (clamped) ``(hw, S)``,
        and whether that pixel is inside the frame."""
        y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        sx, sy = self.shifts.long().T
        tx, ty = x.reshape(-1, 1) + sx, y.reshape(-1, 1) + sy
        inside = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
        return (ty.clamp(0, h - 1) * w + tx.clamp(0, w - 1))[None], inside[None]


class RegionPredictor(nn.Module):
    """MRAA region predictor: ``image (B, 3, H, W)`` → regions at (about) the latent resolution.

    Returns ``{"heatmap": (B, K, h, w), "shift": (B, K, 2)}`` plus, when ``pca_based``,
    ``"covar": (B, K, 2, 2)`` and ``"affine": (B, K, 2, 2)``. Coordinates are (x, y) in [-1, 1] on the
    heatmap's own grid (``h = H/4 + 2·pad − 6``).
    """

    def __init__(
        self,
        *,
        num_regions: int,
        block_expansion: int,
        num_blocks: int,
        max_features: int,
        temperature: float,
        pad: int,
        pca_based: bool,
    ):
        super().__init__()
        self.temperature = temperature
        self.pca_based = pca_based
        self.down = AntiAliasDownsample(3, LATENT_SCALE)
        self.hourglass = Hourglass(
            3, block_expansion=block_expansion, num_blocks=num_blocks, max_features=max_features
        )
        self.heatmap = nn.Conv2d(self.hourglass.out_channels, num_regions, 7, padding=pad)

    def forward(self, image: Tensor) -> Regions:
        logits = self.heatmap(self.hourglass(self.down(image)))
        b, k, h, w = logits.shape
        with _fp32(logits):
            heatmap = F.softmax(logits.float().flatten(2) / self.temperature, dim=-1).view(b, k, h, w)
            grid = identity_grid(h, w, device=heatmap.device, dtype=heatmap.dtype)
            shift = torch.einsum("bkhw,hwi->bki", heatmap, grid)
            regions = {"heatmap": heatmap, "shift": shift}
            if self.pca_based:
                d = grid - shift[:, :, None, None]
                covar = torch.einsum("bkhw,bkhwi,bkhwj->bkij", heatmap, d, d)
                # a region collapsed onto one pixel (high learning rates do it) would have a singular
                # covariance, and inv() would turn the flow into NaN; the floor is far below real regions'
                covar = covar + REGION_VAR_FLOOR * torch.eye(2, device=covar.device)
                regions |= {"covar": covar, "affine": covariance_to_affine(covar)}
        return regions


class BackgroundPredictor(nn.Module):
    """Global affine motion of the background: ``source, driving (B, 3, H, W) → (B, 3, 3)``.

    MRAA's encoder of both frames, mean-pooled into one affine map, optionally on frames downscaled by
    ``scale`` and with the pixel coordinates as two more input channels (``coords``): a zoom or rotation
    moves each pixel by an amount that depends on where it is, which a mean-pooled, zero-padded
    encoder can hardly tell apart without them. Starts near the identity: identity bias, output weights
    N(0, 0.01²). MRAA zeroes them, and then all six outputs' weights grow along one feature direction: on
    the embedded clips such a predictor stayed at the identity for 12,000 steps (docs/model.md).
    """

    def __init__(
        self,
        *,
        block_expansion: int,
        num_blocks: int,
        max_features: int,
        scale: float = 1.0,
        coords: bool = False,
    ):
        super().__init__()
        self.down = AntiAliasDownsample(6, scale)
        self.coords = coords
        self.encoder = HourglassEncoder(
            6 + 2 * coords, block_expansion=block_expansion, num_blocks=num_blocks, max_features=max_features
        )
        self.fc = nn.Linear(self.encoder.out_channels, 6)
        nn.init.normal_(self.fc.weight, std=0.01)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, source: Tensor, driving: Tensor) -> Tensor:
        x = self.down(torch.cat((source, driving), dim=1))
        if self.coords:
            grid = identity_grid(*x.shape[-2:], device=x.device, dtype=x.dtype).permute(2, 0, 1)
            x = torch.cat((x, grid.expand(x.shape[0], -1, -1, -1)), dim=1)
        pooled = self.encoder(x)[-1].mean(dim=(2, 3))
        top = self.fc(pooled).float().view(-1, 2, 3)
        bottom = torch.tensor([0.0, 0.0, 1.0], device=top.device).expand(top.shape[0], 1, 3)
        return torch.cat((top, bottom), dim=1)


class PixelwiseFlowPredictor(nn.Module):
    """Dense flow from a few candidate motions at the latent resolution (MRAA).

    The hourglass sees, per motion (background first), a heatmap of where it applies and the downsampled
    source warped by that motion, plus ``extra_channels`` of other cues; a softmax over the masks mixes the
    motions into one grid, and a sigmoid head gives the occlusion map.
    """

    def __init__(
        self,
        *,
        num_motions: int,
        extra_channels: int,
        block_expansion: int,
        num_blocks: int,
        max_features: int,
    ):
        super().__init__()
        self.down = AntiAliasDownsample(3, LATENT_SCALE)
        self.hourglass = Hourglass(
            num_motions * 4 + extra_channels,
            block_expansion=block_expansion,
            num_blocks=num_blocks,
            max_features=max_features,
        )
        self.mask = nn.Conv2d(self.hourglass.out_channels, num_motions, 7, padding=3)
        self.occlusion = nn.Conv2d(self.hourglass.out_channels, 1, 7, padding=3)

    def forward(
        self, source: Tensor, heatmaps: Tensor, motions: Tensor, extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``source (B, 3, H, W)``, ``heatmaps (B, M, h, w)``, ``motions (B, M, h, w, 2)``, ``extra (B, E, h, w)``
        → flow grid ``(B, h, w, 2)``, occlusion ``(B, 1, h, w)`` and the masks ``(B, M, h, w)``."""
        image = self.down(source)
        b, n, h, w = heatmaps.shape
        deformed = warp(image[:, None].expand(b, n, 3, h, w).flatten(0, 1), motions.flatten(0, 1))
        x = torch.cat(
            (heatmaps[:, :, None].to(deformed.dtype), deformed.unflatten(0, (b, n))), dim=2
        ).flatten(1, 2)
        if extra is not None:
            x = torch.cat((x, extra.to(x.dtype)), dim=1)
        features = self.hourglass(x)
        mask = F.softmax(self.mask(features).float(), dim=1)
        flow = (mask[..., None] * motions).sum(dim=1)
        return flow, torch.sigmoid(self.occlusion(features)), mask


@dataclass
class FlowOutput:
    """F's output: ``flow (B, h, w, 2)`` backward grid, ``occlusion (B, 1, h, w)`` in [0, 1], the
    :class:`RegionPredictor` dicts of the frames (the source's only with MRAA's motion), the motions the flow
    mixes with their masks (:class:`PixelwiseFlowPredictor`; the background's first), and with the
    correlation motion estimator the local motion they were fitted to (:class:`CorrelationFlow`)."""

    flow: Tensor
    occlusion: Tensor
    source_regions: Regions | None
    driving_regions: Regions
    motions: Tensor
    masks: Tensor
    local: Tensor | None = None


class FlowPredictor(nn.Module):
    """F: a region predictor, the background motion (``cfg.use_background``) and a pixelwise flow predictor
    that mixes the motions. ``cfg.motion_estimator`` says where the motions come from:

    - ``mraa`` (the paper, MRAA): each region's affine from its position and shape in both frames
      (T_k(z) = A_s·A_d⁻¹·(z − μ_d) + μ_s), the background's regressed from both frames;
    - ``correlation``: affine fits of the local motion a cost volume finds (:class:`CorrelationFlow`): each
      region's over its Gaussian in the driving frame, the background's a robust fit over the whole frame.
      The mixing hourglass also sees how far each motion is from the local one, and the driving frame.
    """

    def __init__(self, cfg: LFAEConfig):
        super().__init__()
        self.region_predictor = RegionPredictor(
            num_regions=cfg.num_regions,
            block_expansion=cfg.region_block_expansion,
            num_blocks=cfg.region_num_blocks,
            max_features=cfg.region_max_features,
            temperature=cfg.region_temperature,
            pad=cfg.region_pad,
            pca_based=cfg.pca_based,
        )
        self.use_background = cfg.use_background
        correlation = cfg.motion_estimator == "correlation"
        self.correlation = (
            CorrelationFlow(channels=cfg.corr_channels, radius=cfg.corr_radius) if correlation else None
        )
        self.background_predictor = (
            BackgroundPredictor(
                block_expansion=cfg.bg_block_expansion,
                num_blocks=cfg.bg_num_blocks,
                max_features=cfg.bg_max_features,
                scale=cfg.bg_scale,
                coords=cfg.bg_coords,
            )
            if cfg.use_background and not correlation
            else None
        )
        motions = cfg.num_regions + 1 + correlation
        self.pixelwise_flow_predictor = PixelwiseFlowPredictor(
            num_motions=motions,
            extra_channels=motions + 3 if correlation else 0,
            block_expansion=cfg.flow_block_expansion,
            num_blocks=cfg.flow_num_blocks,
            max_features=cfg.flow_max_features,
        )
        mask_bias = self.pixelwise_flow_predictor.mask.bias
        if correlation and mask_bias is not None:
            with torch.no_grad():
                mask_bias[-1] += LOCAL_MASK_PRIOR
        self.motion_frozen = False

    def motion_modules(self) -> list[nn.Module]:
        """Everything that decides the flow: the region and background predictors or the cost volume, the
        pixelwise hourglass and its masks (not the occlusion head)."""
        pixelwise = self.pixelwise_flow_predictor
        modules = [
            self.region_predictor,
            self.background_predictor,
            self.correlation,
            pixelwise.hourglass,
            pixelwise.mask,
        ]
        return [module for module in modules if module is not None]

    def freeze_motion(self) -> None:
        """Fix the flow: its parameters stop learning and its BatchNorm statistics stop moving (also after a
        later ``.train()``); the occlusion head still trains on the frozen features."""
        self.motion_frozen = True
        for module in self.motion_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> FlowPredictor:
        super().train(mode)
        if self.motion_frozen:
            for module in self.motion_modules():
                module.eval()
        return self

    def forward(self, source: Tensor, driving: Tensor) -> FlowOutput:
        """``source, driving (B, 3, H, W)`` in [0, 1] → backward flow from driving to source."""
        b, h, w = len(source), source.shape[-2] // 4, source.shape[-1] // 4
        grid = identity_grid(h, w, device=source.device)
        driving_regions = self.region_predictor(driving)
        with _fp32(grid):
            where = region_gaussians(driving_regions, grid)
        if self.correlation is None:
            source_regions = self.region_predictor(source)
            background = (
                self.background_predictor(source, driving) if self.background_predictor is not None else None
            )
            with _fp32(grid):
                heatmaps = where - region_gaussians(source_regions, grid)
                motions = sparse_motions(source_regions, driving_regions, grid, background)
            local = extra = None
        else:
            source_regions, local = None, self.correlation(source, driving)
            with _fp32(grid):
                fitted = [fit_affine(local, where)]
                if self.use_background:
                    fitted.insert(0, robust_affine(local))
                motions = affine_motions(torch.cat(fitted, dim=1), h, w)
                if not self.use_background:  # the background stays put
                    motions = torch.cat((grid.expand(b, 1, h, w, 2), motions), dim=1)
                motions = torch.cat((motions, local[:, None]), dim=1)
                heatmaps = torch.cat((where, where.new_zeros(b, 1, h, w)), dim=1)
                # a cue for the masks, not a way for their losses to move the local motion
                distance = (motions - local[:, None]).detach().norm(dim=-1) * (
                    (max(h, w) - 1) / 2
                )  # latent px
            extra = torch.cat((distance, F.interpolate(driving, size=(h, w), mode="area")), dim=1)
        heatmaps = torch.cat((heatmaps.new_zeros(b, 1, h, w), heatmaps), dim=1)
        flow, occlusion, masks = self.pixelwise_flow_predictor(source, heatmaps, motions, extra)
        return FlowOutput(flow, occlusion, source_regions, driving_regions, motions, masks, local)


# -------------------------------------------------------------------------------------------- LFAE


class LatentFlowAutoEncoder(nn.Module):
    """Encoder Φ, flow predictor F and decoder Ω of stage one; images are ``(B, 3, H, W)`` in [0, 1]."""

    def __init__(self, cfg: LFAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(channels=cfg.base_channels)
        self.flow_predictor = FlowPredictor(cfg)
        self.decoder = Decoder(
            channels=cfg.base_channels,
            res_blocks=cfg.decoder_res_blocks,
            skips=cfg.decoder == "skips",
            padding=cfg.padding,
        )

    def encode(self, image: Tensor) -> EncoderOutput:
        return self.encoder(image)

    def decode(
        self, features: EncoderOutput, source_image: Tensor, flow: Tensor, occlusion: Tensor
    ) -> Tensor:
        """Render frames from the source x0: ``flow (N, h, w, 2)``, ``occlusion (N, 1, h, w)`` → ``(N, 3, H, W)``.

        ``features``/``source_image`` may have batch 1 (one x0 for N flows, e.g. a whole generated clip)
        or batch N.
        """
        n = flow.shape[0]
        features = EncoderOutput(
            latent=_expand_batch(features.latent, n), skips=tuple(_expand_batch(s, n) for s in features.skips)
        )
        return self.decoder(features, _expand_batch(source_image, n), flow, occlusion)

    def forward(self, source: Tensor, driving: Tensor) -> dict[str, Tensor | Regions]:
        """The frame-pair training step: reconstruct ``driving`` from ``source`` (both ``(B, 3, H, W)``)."""
        motion = self.flow_predictor(source, driving)
        return {
            "prediction": self.decode(self.encode(source), source, motion.flow, motion.occlusion),
            "flow": motion.flow,
            "occlusion": motion.occlusion,
            "source_regions": motion.source_regions,
            "driving_regions": motion.driving_regions,
        }
