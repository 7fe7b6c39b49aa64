from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage import data
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from lfdm.config import EquivarianceConfig, PerceptualConfig
from lfdm.losses import (
    _TAPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetFeatures,
    PerceptualLoss,
    RandomTransform,
    equivariance_loss,
    lfae_loss,
    load_imagenet_model,
)
from lfdm.models.lfae import covariance_to_affine
from lfdm.models.warp import identity_grid


def _photo(image, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture(scope="module")
def perceptual() -> PerceptualLoss:
    return PerceptualLoss(PerceptualConfig())


# ------------------------------------------------------------------------------------- perceptual


def test_offline_mobilenet_recognises_a_cat() -> None:
    model = load_imagenet_model("mobilenet_v2")  # load_state_dict is strict: every key present
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = (_photo(data.chelsea(), 224) - mean) / std
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 286)), top5  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("backbone", sorted(_TAPS))
def test_taps_mirror_vgg_relu_n_1(backbone: str) -> None:
    """Five taps; each (but the last) is the final layer before the resolution halves (VGG: relu{n}_1)."""
    with torch.device("meta"):
        features = getattr(torchvision.models, backbone)().features
        taps = _TAPS[backbone]
        sizes, x = [], torch.zeros(1, 3, 64, 64)
        for layer in features:
            x = layer(x)
            sizes.append(x.shape[-1])
    assert len(taps) == 5 and list(taps) == sorted(taps)
    if backbone == "vgg19":
        assert all(isinstance(features[i], nn.ReLU) and isinstance(features[i - 1], nn.Conv2d) for i in taps)
        assert all(isinstance(features[i - 2], nn.MaxPool2d) for i in taps[1:])  # first ReLU of each block
    else:
        halvings = [i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1]]
        assert [i + 1 for i in taps[:-1]] == halvings


def test_perceptual_features_are_frozen_and_stay_in_eval(perceptual: PerceptualLoss) -> None:
    perceptual.train()
    assert perceptual.training and not any(m.training for m in perceptual.features.modules())
    assert not any(p.requires_grad for p in perceptual.parameters())
    assert len(perceptual.features.layers) == _TAPS["mobilenet_v2"][-1] + 1  # deeper layers never run
    feats = perceptual.features(torch.rand(1, 3, 32, 32))
    assert len(feats) == 5 and [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]


def test_perceptual_taps_equal_the_network_as_loaded(perceptual: PerceptualLoss) -> None:
    """The frozen trunk's batch norms are folded into its convolutions: every tap must stay what torchvision's
    MobileNetV2 gives (float rounding only)."""
    images = (
        _photo(data.astronaut(), 64).expand(2, -1, -1, -1) * torch.tensor([1.0, 0.5])[:, None, None, None]
    )
    reference = load_imagenet_model("mobilenet_v2").features
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        x, expected = (images - mean) / std, []
        for i, layer in enumerate(reference[: _TAPS["mobilenet_v2"][-1] + 1]):
            x = layer(x)
            if i in _TAPS["mobilenet_v2"]:
                expected.append(x)
        got = perceptual.features(images)
    assert not [m for m in perceptual.modules() if isinstance(m, nn.BatchNorm2d)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4 * e.abs().max().item())


def test_perceptual_loss_grows_with_corruption(perceptual: PerceptualLoss) -> None:
    image = _photo(data.astronaut(), 48)
    noise = torch.randn_like(image)
    assert perceptual(image, image).item() < 1e-6
    for corrupt in (
        lambda s: gaussian_blur(image, kernel_size=9, sigma=s),
        lambda s: (image + 0.1 * s * noise).clamp(0, 1),
    ):
        mild, strong = (perceptual(corrupt(s), image).item() for s in (0.7, 2.0))
        assert 0 < mild < strong


def test_perceptual_loss_differentiates_the_prediction_only(perceptual: PerceptualLoss) -> None:
    target = torch.rand(2, 3, 32, 32, requires_grad=True)
    prediction = torch.rand(2, 3, 32, 32, requires_grad=True)
    perceptual(prediction, target).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None for p in perceptual.parameters())


def test_vgg19_without_weights_names_the_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train_lfae.perceptual.weights") as err:
        PerceptualLoss(PerceptualConfig(backbone="vgg19"))
    assert str(tmp_path / "checkpoints" / "vgg19-dcbb9e9d.pth") in str(err.value)
    missing = tmp_path / "mine.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageNetFeatures(backbone="vgg19", weights=missing)


# ------------------------------------------------------------------------------------ transforms


def _identity_cases() -> list[RandomTransform]:
    zero = EquivarianceConfig(sigma_affine=0, sigma_tps=0)
    return [
        RandomTransform.sample(2, zero),
        RandomTransform(theta=torch.eye(2, 3).repeat(2, 1, 1), tps_weights=torch.zeros(2, 5, 5)),
    ]


@pytest.mark.parametrize("transform", _identity_cases())
def test_identity_transform(transform: RandomTransform) -> None:
    frame = torch.rand(2, 3, 12, 17)
    coords = torch.rand(2, 6, 2) * 2 - 1
    assert torch.allclose(transform.transform_frame(frame), frame, atol=1e-6)
    assert torch.equal(transform.warp_coordinates(coords), coords)
    assert torch.equal(transform.jacobian(coords), torch.eye(2).expand(2, 6, 2, 2))


def test_shift_transform_moves_coordinates_and_pixels() -> None:
    h, w, t = 10, 16, torch.tensor([[2.0, -1.0], [0.0, 3.0]])  # shifts in pixels
    theta = torch.eye(2, 3).repeat(2, 1, 1)
    theta[:, 0, 2], theta[:, 1, 2] = t[:, 0] * 2 / (w - 1), t[:, 1] * 2 / (h - 1)
    transform = RandomTransform(theta=theta)
    coords = torch.rand(2, 5, 2) * 2 - 1
    assert torch.allclose(transform.warp_coordinates(coords), coords + theta[:, None, :, 2])
    assert torch.equal(transform.jacobian(coords), torch.eye(2).expand(2, 5, 2, 2))
    frame = torch.rand(2, 1, h, w)
    out = transform.transform_frame(frame)
    # out(p) = frame(p + t)
    assert torch.allclose(out[0, :, 1:, : w - 2], frame[0, :, : h - 1, 2:], atol=1e-5)
    assert torch.allclose(out[1, :, : h - 3], frame[1, :, 3:], atol=1e-5)


def test_jacobian_matches_autograd() -> None:
    cfg = EquivarianceConfig(sigma_affine=0.1, sigma_tps=0.05, points_tps=4)
    generator = torch.Generator().manual_seed(1)
    transform = RandomTransform.sample(3, cfg, dtype=torch.float64, generator=generator)
    coords = (torch.rand(3, 7, 2, dtype=torch.float64) * 2 - 1).requires_grad_()
    warped = transform.warp_coordinates(coords)
    rows = [torch.autograd.grad(warped[..., i].sum(), coords, retain_graph=True)[0] for i in range(2)]
    expected = torch.stack(rows, dim=-2)
    assert not torch.allclose(expected, torch.eye(2, dtype=torch.float64).expand_as(expected), atol=1e-3)
    assert torch.allclose(transform.jacobian(coords), expected, atol=1e-10)


def test_sampling_follows_the_generator_and_dtype() -> None:
    cfg = EquivarianceConfig()

    def draw(seed: int) -> RandomTransform:
        generator = torch.Generator().manual_seed(seed)
        return RandomTransform.sample(4, cfg, dtype=torch.float64, generator=generator)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.theta.dtype == a.tps_weights.dtype == torch.float64 and a.tps_weights.shape == (4, 5, 5)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.tps_weights, b.tps_weights)
    assert not torch.equal(a.theta, c.theta)
    affine_noise = a.theta - torch.eye(2, 3, dtype=torch.float64)
    assert math.isclose(affine_noise.std().item(), cfg.sigma_affine, rel_tol=0.6)


# ---------------------------------------------------------------------------------- equivariance


def _pca_regions(heatmap: torch.Tensor) -> dict[str, torch.Tensor]:
    """MRAA-style regions from a normalised ``(B, K, H, W)`` heatmap."""
    grid = identity_grid(*heatmap.shape[2:], dtype=heatmap.dtype)
    shift = torch.einsum("bkhw,hwc->bkc", heatmap, grid)
    centred = grid - shift[:, :, None, None]
    covar = torch.einsum("bkhw,bkhwi,bkhwj->bkij", heatmap, centred, centred)
    return {"heatmap": heatmap, "shift": shift, "covar": covar, "affine": covariance_to_affine(covar)}


class TinyRegionPredictor(nn.Module):
    """Conv → spatial softmax → PCA: deterministic, not equivariant."""

    def __init__(self, regions: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, regions, 5, padding=2)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.conv(image)
        return _pca_regions(F.softmax(logits.flatten(2) / 0.1, -1).view_as(logits))


def _blob_regions(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Intensity as the heatmap: exactly equivariant while the content stays inside the frame."""
    heat = image[:, :1]
    return _pca_regions(heat / heat.sum((2, 3), keepdim=True))


def _blob(size: int = 32) -> torch.Tensor:
    grid = identity_grid(size, size) * (size - 1) / 2  # pixels from the centre
    x, y = grid[..., 0] - 1.5, grid[..., 1] + 1.0
    blob = torch.exp(-((x + 0.4 * y) ** 2) / 8 - y**2 / 4)  # tilted, anisotropic
    return blob.expand(2, 3, size, size)


def test_equivariance_loss_vanishes_for_the_identity() -> None:
    predictor = TinyRegionPredictor()
    driving = torch.rand(2, 3, 24, 24)
    cfg = EquivarianceConfig(sigma_affine=0, sigma_tps=0)
    losses = equivariance_loss(predictor, driving, predictor(driving), cfg)
    assert set(losses) == {"equivariance_shift", "equivariance_affine"}
    assert all(v.item() < 1e-5 for v in losses.values()), losses


def test_equivariance_loss_vanishes_for_an_equivariant_predictor() -> None:
    driving, cfg = _blob(), EquivarianceConfig()
    step = 2 / (driving.shape[-1] - 1)
    shift = RandomTransform(theta=torch.tensor([[1, 0, 3 * step], [0, 1, -2 * step]]).expand(2, 2, 3))
    losses = equivariance_loss(_blob_regions, driving, _blob_regions(driving), cfg, transform=shift)
    assert all(v.item() < 1e-4 for v in losses.values()), losses
    # a quarter turn maps pixel centres onto pixel centres: the shift term checks T's orientation
    quarter = RandomTransform(theta=torch.tensor([[0.0, -1, 0], [1, 0, 0]]).expand(2, 2, 3))
    losses = equivariance_loss(_blob_regions, driving, _blob_regions(driving), cfg, transform=quarter)
    assert losses["equivariance_shift"].item() < 1e-4


def test_equivariance_loss_is_positive_and_trains_the_predictor() -> None:
    predictor = TinyRegionPredictor()
    driving = torch.rand(2, 3, 24, 24)
    cfg = EquivarianceConfig(sigma_affine=0.2, sigma_tps=0.01)
    losses = equivariance_loss(predictor, driving, predictor(driving), cfg, torch.Generator().manual_seed(0))
    assert all(v.item() > 1e-3 for v in losses.values()), losses
    sum(losses.values()).backward()
    assert predictor.conv.weight.grad.abs().sum() > 0


def test_equivariance_loss_skips_work() -> None:
    def must_not_run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        raise AssertionError("the region predictor ran with weight 0")

    driving = torch.rand(1, 3, 8, 8)
    assert equivariance_loss(must_not_run, driving, {}, EquivarianceConfig(weight=0)) == {}

    class Frozen(torch.nn.Linear):  # train_lfae.freeze_motion: the terms could train nothing
        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            raise AssertionError("a frozen region predictor ran")

    assert equivariance_loss(Frozen(1, 1).requires_grad_(False), driving, {}, EquivarianceConfig()) == {}
    shift_only = {"shift": torch.zeros(1, 2, 2)}
    losses = equivariance_loss(lambda _: shift_only, driving, shift_only, EquivarianceConfig())
    assert set(losses) == {"equivariance_shift"}


def test_lfae_loss_sums_every_term(perceptual: PerceptualLoss) -> None:
    predictor = TinyRegionPredictor()
    driving = torch.rand(2, 3, 32, 32)
    prediction = torch.rand(2, 3, 32, 32, requires_grad=True)
    cfg = EquivarianceConfig(weight=5.0)
    generator = torch.Generator().manual_seed(0)
    losses = lfae_loss(prediction, driving, predictor, predictor(driving), perceptual, cfg, generator)
    assert set(losses) == {"perceptual", "equivariance_shift", "equivariance_affine", "total"}
    parts = [v for k, v in losses.items() if k != "total"]
    assert torch.allclose(losses["total"], sum(parts)) and all(v.item() > 0 for v in parts)
    losses["total"].backward()
    assert prediction.grad.abs().sum() > 0 and predictor.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("estimator", ["correlation", "mraa"])
def test_distillation_brings_f_towards_the_teacher_on_a_real_clip(estimator) -> None:
    """Eighty steps of pretrain_flow's loss on twelve frame pairs of a real talking head take F's flow well
    towards the teacher's, and every term of the loss trains something."""
    from test_overfit import TINY_LFAE
    from test_teacher_store import carphone

    from lfdm.config import PretrainFlowConfig
    from lfdm.data.frames import to_tensor
    from lfdm.data.teacher_store import frame_pairs
    from lfdm.losses import distillation_loss
    from lfdm.models.lfae import FlowPredictor
    from lfdm.models.warp import warp
    from lfdm.teacher import teacher_flows

    clip = carphone(8)
    pairs = frame_pairs(len(clip), 12, seed=0, video_id="carphone")
    teacher = teacher_flows(clip[pairs[:, 0]], clip[pairs[:, 1]], 8, "dis_fast")[0]
    source, driving = to_tensor(clip[pairs[:, 0]]), to_tensor(clip[pairs[:, 1]])
    model = FlowPredictor(TINY_LFAE.model_copy(update={"motion_estimator": estimator, "corr_channels": 8}))
    cfg = PretrainFlowConfig(equivariance=EquivarianceConfig(weight=1.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def error() -> float:
        with torch.no_grad():
            return float((model(source, driving).flow - teacher.grid).norm(dim=-1).mean())

    def warp_error() -> float:  # what the photometric term measures
        with torch.no_grad():
            return float((warp(source, model(source, driving).flow, padding="border") - driving).abs().mean())

    before, warp_before = error(), warp_error()
    for step in range(80):
        losses = distillation_loss(
            model(source, driving), model, source, driving, teacher.grid, teacher.reliable, cfg
        )
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        if step == 0:
            expected = {
                "flow",
                "photometric",
                "background",
                "regions",
                "occlusion",
                "equivariance_shift",
                "equivariance_affine",
            }
            assert set(losses) - {"total"} == expected | ({"local"} if estimator == "correlation" else set())
            assert model.pixelwise_flow_predictor.occlusion.weight.grad.abs().sum() > 0
    assert error() < 0.6 * before, (before, error())
    assert warp_error() < warp_before, (warp_before, warp_error())


def test_mobilenet_features_stay_fp32_under_bf16_autocast(perceptual: PerceptualLoss) -> None:
    # its depthwise convolutions are slower in bf16 on the CPU: the trunk runs in fp32 channels-last
    images = torch.rand(2, 3, 32, 32)
    plain = perceptual.features(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = perceptual.features(images)
    # fp32: autocast changes nothing
    assert all(torch.equal(a, p) for a, p in zip(autocast, plain, strict=True))
    assert perceptual.features.layers[0][0].weight.is_contiguous(memory_format=torch.channels_last)
