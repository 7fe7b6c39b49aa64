from __future__ import annotations

import pytest
import torch

from lfdm.config import LFAEConfig
from lfdm.models.lfae import (
    REGION_VAR_FLOOR,
    AntiAliasDownsample,
    BackgroundPredictor,
    CorrelationFlow,
    DownBlock2d,
    Hourglass,
    LatentFlowAutoEncoder,
    RegionPredictor,
    ResBlock2d,
    UpBlock2d,
    affine_motions,
    covariance_to_affine,
    fit_affine,
    revert_axis_swap,
    robust_affine,
    sparse_motions,
)
from lfdm.models.warp import identity_grid, warp

B, SIZE, C, K = 2, 32, 8, 4


def tiny_cfg(**overrides) -> LFAEConfig:
    """MRAA's F unless ``motion_estimator`` says otherwise."""
    small = {"max_features": 32, "block_expansion": 8, "num_blocks": 2}
    return LFAEConfig(
        **{
            "base_channels": C,
            "decoder_res_blocks": 1,
            "num_regions": K,
            "motion_estimator": "mraa",
            "corr_channels": 8,
            **{f"{part}_{key}": value for part in ("region", "flow", "bg") for key, value in small.items()},
            **overrides,
        }
    )


def frames(n: int = B) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE)


def identity_flow(n: int, side: int = SIZE // 4) -> torch.Tensor:
    return identity_grid(side, side).expand(n, side, side, 2)


def test_blocks_and_hourglass_shapes():
    x = torch.randn(2, 6, 16, 16)
    assert DownBlock2d(6, 10)(x).shape == (2, 10, 8, 8)
    assert UpBlock2d(6, 10)(x).shape == (2, 10, 32, 32)
    assert ResBlock2d(6)(x).shape == x.shape
    hourglass = Hourglass(6, block_expansion=4, num_blocks=3, max_features=12)
    assert hourglass.out_channels == 4 + 6
    assert hourglass(x).shape == (2, 10, 16, 16)
    # channel growth block_expansion·2^(i+1), capped at max_features
    assert [b[0][0].out_channels for b in hourglass.encoder.blocks] == [8, 12, 12]


def test_anti_alias_downsample():
    down = AntiAliasDownsample(3, 0.25)
    assert down.kernel.sum(dim=(-1, -2)).allclose(torch.ones(3, 1))
    assert not dict(down.named_buffers(remove_duplicate=False)).keys() & down.state_dict().keys()
    x = torch.full((1, 3, 32, 32), 0.7)
    y = down(x)
    assert y.shape == (1, 3, 8, 8)
    # a normalised blur keeps a constant away from the zero-padded border
    torch.testing.assert_close(y[..., 3:5, 3:5], torch.full((1, 3, 2, 2), 0.7))
    noise = torch.randn(1, 3, 32, 32)
    assert down(noise).std() < noise[..., ::4, ::4].std()  # it blurs, not just subsamples
    assert AntiAliasDownsample(3, 1.0)(noise) is noise
    with pytest.raises(ValueError):
        AntiAliasDownsample(3, 0.3)


@pytest.mark.parametrize(
    ("decoder", "estimator"), [("skips", "mraa"), ("latent", "mraa"), ("skips", "correlation")]
)
def test_forward_shapes(decoder: str, estimator: str):
    model = LatentFlowAutoEncoder(tiny_cfg(decoder=decoder, motion_estimator=estimator))
    source, driving = frames(), frames()
    features = model.encode(source)
    assert features.latent.shape == (B, 4 * C, SIZE // 4, SIZE // 4)
    assert [s.shape for s in features.skips] == [
        (B, C, SIZE, SIZE),
        (B, 2 * C, SIZE // 2, SIZE // 2),
        (B, 4 * C, SIZE // 4, SIZE // 4),
    ]
    out = model(source, driving)
    assert out["prediction"].shape == source.shape
    assert out["prediction"].min() >= 0 and out["prediction"].max() <= 1
    assert out["flow"].shape == (B, SIZE // 4, SIZE // 4, 2)
    assert out["occlusion"].shape == (B, 1, SIZE // 4, SIZE // 4)
    assert out["occlusion"].min() >= 0 and out["occlusion"].max() <= 1
    for regions in (
        (out["source_regions"], out["driving_regions"]) if estimator == "mraa" else (out["driving_regions"],)
    ):
        assert regions["heatmap"].shape == (B, K, SIZE // 4, SIZE // 4)
        torch.testing.assert_close(regions["heatmap"].sum(dim=(2, 3)), torch.ones(B, K))
        assert regions["shift"].shape == (B, K, 2)
        assert regions["shift"].abs().max() <= 1
        assert regions["covar"].shape == regions["affine"].shape == (B, K, 2, 2)


def test_a_region_collapsed_onto_one_pixel_keeps_an_invertible_covariance():
    """A one-hot heatmap (seen in training at high learning rates) keeps the covariance floor, so the
    flow stays finite instead of turning NaN through inv(covar)."""
    model = LatentFlowAutoEncoder(tiny_cfg())
    predictor = model.flow_predictor.region_predictor
    with torch.no_grad():
        predictor.heatmap.weight.zero_()
        predictor.heatmap.bias.zero_()
        predictor.heatmap.weight[:, :, 3, 3] = 1e4  # logits follow the input: every heatmap becomes one-hot
    regions = predictor(frames())
    assert regions["heatmap"].amax(dim=(2, 3)).min() > 0.999
    torch.testing.assert_close(
        regions["covar"], torch.eye(2).expand(B, K, 2, 2) * REGION_VAR_FLOOR, atol=1e-6, rtol=0
    )
    out = model(frames(), frames())
    assert torch.isfinite(out["flow"]).all() and torch.isfinite(out["prediction"]).all()


def test_small_region_pad_uses_the_heatmaps_own_grid():
    model = LatentFlowAutoEncoder(tiny_cfg(region_pad=1))
    regions = model.flow_predictor.region_predictor(frames())
    assert regions["heatmap"].shape == (B, K, SIZE // 4 - 4, SIZE // 4 - 4)
    assert model(frames(), frames())["flow"].shape == (B, SIZE // 4, SIZE // 4, 2)


def test_without_background_and_pca():
    model = LatentFlowAutoEncoder(tiny_cfg(use_background=False, pca_based=False))
    assert model.flow_predictor.background_predictor is None
    out = model(frames(), frames())
    assert out["source_regions"].keys() == {"heatmap", "shift"}
    assert out["prediction"].shape == (B, 3, SIZE, SIZE)


@pytest.mark.parametrize(("scale", "coords"), [(1.0, False), (0.5, True)])
def test_background_predictor_starts_near_the_identity(scale, coords):
    torch.manual_seed(0)
    bg = BackgroundPredictor(block_expansion=4, num_blocks=2, max_features=8, scale=scale, coords=coords)
    affine = bg(frames(), frames())
    torch.testing.assert_close(affine[:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(B, 3))
    assert 0 < (affine - torch.eye(3)).abs().max() < 0.1  # random enough to learn from, small enough to start


def test_background_encoder_sees_both_frames_downscaled_and_the_coordinates():
    bg = BackgroundPredictor(block_expansion=4, num_blocks=2, max_features=8, scale=0.5, coords=True)
    seen = []
    bg.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x, y = frames(), frames()
    bg(x, y)
    side = SIZE // 2
    assert seen[0].shape == (B, 8, side, side)
    torch.testing.assert_close(seen[0][:, :6], bg.down(torch.cat((x, y), dim=1)))
    torch.testing.assert_close(
        seen[0][:, 6:], identity_grid(side, side).permute(2, 0, 1).expand(B, 2, side, side)
    )


def test_background_motion_is_its_affine_applied_to_the_grid():
    affine = torch.tensor([[[0.9, -0.2, 0.1], [0.3, 1.1, -0.2], [0.0, 0.0, 1.0]]])
    grid = identity_grid(6, 5)
    regions = {"shift": torch.zeros(1, 2, 2)}
    background = sparse_motions(regions, regions, grid, affine)[:, 0]
    expected = grid @ affine[0, :2, :2].T + affine[0, :2, 2]  # A·(x, y) + b at every position
    torch.testing.assert_close(background, expected[None])


def test_identical_frames_give_equal_regions_and_identity_flow():
    model = LatentFlowAutoEncoder(tiny_cfg()).eval()
    torch.nn.init.zeros_(model.flow_predictor.background_predictor.fc.weight)  # background: the identity
    x = frames()
    with torch.no_grad():
        motion = model.flow_predictor(x, x)
    for key in ("shift", "affine"):
        torch.testing.assert_close(motion.source_regions[key], motion.driving_regions[key])
    # every sparse motion is then the identity, so any mixture of them is too
    torch.testing.assert_close(motion.flow, identity_flow(B), atol=1e-5, rtol=0)


def test_region_shift_and_affine_follow_a_blob():
    predictor = RegionPredictor(
        num_regions=1, block_expansion=4, num_blocks=1, max_features=8, temperature=0.1, pad=3, pca_based=True
    )
    with torch.no_grad():  # the hourglass output ends with its input: read the image's brightness from it
        predictor.heatmap.weight.zero_()
        predictor.heatmap.bias.zero_()
        predictor.heatmap.weight[0, -3:, 3, 3] = 1.0
    side, cx, cy = 64, 40.0, 20.0
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    blob = torch.exp(-((xs - cx) ** 2) / (2 * 8.0**2) - (ys - cy) ** 2 / (2 * 3.0**2))
    regions = predictor(blob.expand(1, 3, side, side))
    # the predictor keeps image pixel 4j as latent pixel j, at -1 + 2j/(side/4 - 1)
    expected = torch.tensor([cx, cy]) / 4 * 2 / (side / 4 - 1) - 1
    torch.testing.assert_close(regions["shift"][0, 0], expected, atol=0.02, rtol=0)
    affine = regions["affine"][0, 0]
    assert affine[0, 0] > 2 * affine[1, 1] > 0  # major axis along x
    assert affine[0, 1].abs() < 1e-3 and affine[1, 0].abs() < 1e-3


def test_covariance_to_affine_matches_svd():
    m = torch.randn(64, 2, 2, dtype=torch.float64)
    covar = m @ m.transpose(-1, -2) + 1e-3 * torch.eye(2, dtype=torch.float64)
    affine = covariance_to_affine(covar)
    u, s, _ = torch.linalg.svd(covar)
    reference = u * s.sqrt().unsqueeze(-2)
    torch.testing.assert_close(affine.abs(), reference.abs())  # the SVD's column signs are arbitrary
    torch.testing.assert_close(affine @ affine.transpose(-1, -2), covar)
    assert (affine[:, 0, 0] >= 0).all() and (torch.linalg.det(affine) > 0).all()  # a rotation, no reflection
    iso = (0.02 * torch.eye(2)).requires_grad_()
    covariance_to_affine(iso).sum().backward()
    assert torch.isfinite(iso.grad).all()


def test_revert_axis_swap_turns_half_turns_back():
    a = covariance_to_affine(torch.tensor([[0.05, 0.01], [0.01, 0.02]]))
    torch.testing.assert_close(revert_axis_swap(-a), a)
    torch.testing.assert_close(revert_axis_swap(a), a)


def test_correlation_finds_a_shift_between_feature_maps():
    """With the features given (the encoder left out) and a low temperature, the soft arg-max lands on the
    displacement where the driving features match the source's: one latent pixel to the right."""
    torch.manual_seed(0)
    flow = CorrelationFlow(channels=8, radius=2)
    flow.encoder = torch.nn.Identity()
    flow.residual = torch.nn.Conv2d(3 * 8, 8, 1)  # warped, driving, difference of 8-channel "frames"
    with torch.no_grad():
        flow.log_temperature.fill_(-5.0)
    source = torch.randn(1, 8, 8, 8)
    driving = torch.roll(source, shifts=-1, dims=-1)  # driving(x) = source(x + 1)
    grid = flow(source, driving)
    expected = identity_grid(8, 8) + torch.tensor([2 / 7, 0.0])
    torch.testing.assert_close(grid[0, :, :-1], expected[:, :-1], atol=1e-3, rtol=0)  # the last column wraps


def test_affine_fits_recover_affine_motion_and_ignore_a_minority():
    theta = torch.tensor([[[[0.95, -0.1, 0.05], [0.12, 1.05, -0.1]]]])
    field = affine_motions(theta, 12, 12)[:, 0]
    torch.testing.assert_close(
        fit_affine(field, torch.ones(1, 1, 12, 12), ridge=0.0), theta, atol=1e-4, rtol=0
    )
    moving = field.clone()
    moving[:, 3:7, 3:7] += 0.4  # a patch moving on its own, a ninth of the frame
    torch.testing.assert_close(robust_affine(moving), theta, atol=5e-3, rtol=0)
    assert (
        fit_affine(moving, torch.ones(1, 1, 12, 12)) - theta
    ).abs().max() > 0.02  # plain least squares is dragged


def test_correlation_motions_are_the_fits_and_the_local_motion():
    model = LatentFlowAutoEncoder(tiny_cfg(motion_estimator="correlation"))
    motion = model.flow_predictor(frames(), frames())
    side = SIZE // 4
    assert motion.motions.shape == (B, K + 2, side, side, 2) and motion.masks.shape == (B, K + 2, side, side)
    torch.testing.assert_close(motion.motions[:, -1], motion.local)  # the last candidate is the local motion
    assert motion.source_regions is None and model.flow_predictor.background_predictor is None


def test_identity_warp_is_exact():
    x = torch.randn(B, 5, 12, 12)
    torch.testing.assert_close(warp(x, identity_flow(B, 12)), x, atol=1e-5, rtol=0)


def test_skips_decode_with_identity_flow_returns_the_source():
    model = LatentFlowAutoEncoder(tiny_cfg(decoder="skips")).eval()
    source = frames(1)
    with torch.no_grad():
        out = model.decode(
            model.encode(source), source, identity_flow(1), torch.ones(1, 1, SIZE // 4, SIZE // 4)
        )
    torch.testing.assert_close(out, source, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_where_the_flow_leaves_the_source_the_skips_decoder_reads_its_padding(padding: str):
    """A flow that samples one frame to the right of the source, fully visible: the decoder returns the
    warped source, so every pixel reads outside it — black with zeros, the right edge with border."""
    model = LatentFlowAutoEncoder(tiny_cfg(decoder="skips", padding=padding)).eval()
    source, side = frames(1), SIZE // 4
    flow = identity_flow(1, side) + torch.tensor([2.5, 0.0])
    with torch.no_grad():
        out = model.decode(model.encode(source), source, flow, torch.ones(1, 1, side, side))
    expected = source[..., -1:].expand_as(source) if padding == "border" else torch.zeros_like(source)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder", ["skips", "latent"])
def test_fully_occluded_decode_ignores_the_source(decoder: str):
    model = LatentFlowAutoEncoder(tiny_cfg(decoder=decoder)).eval()
    flow, occlusion = identity_flow(1), torch.zeros(1, 1, SIZE // 4, SIZE // 4)
    with torch.no_grad():
        a, b = (model.decode(model.encode(x), x, flow, occlusion) for x in frames().split(1))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("decoder", ["skips", "latent"])
def test_one_source_decodes_a_batch_of_flows(decoder: str):
    model = LatentFlowAutoEncoder(tiny_cfg(decoder=decoder)).eval()
    n, side = 3, SIZE // 4
    source = frames(1)
    flows = identity_flow(n, side) + 0.2 * torch.randn(n, side, side, 2)
    occlusions = torch.rand(n, 1, side, side)
    with torch.no_grad():
        features = model.encode(source)
        batched = model.decode(features, source, flows, occlusions)
        single = torch.cat(
            [model.decode(features, source, f[None], o[None]) for f, o in zip(flows, occlusions, strict=True)]
        )
    assert batched.shape == (n, 3, SIZE, SIZE)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])
    with pytest.raises(ValueError):
        model.decode(model.encode(frames(2)), frames(2), flows, occlusions)


def test_gradients_reach_every_parameter_group():
    model = LatentFlowAutoEncoder(tiny_cfg())
    model(frames(), frames())["prediction"].mean().backward()
    groups = {
        "encoder": model.encoder,
        "decoder": model.decoder,
        "region_predictor": model.flow_predictor.region_predictor,
        "background_predictor": model.flow_predictor.background_predictor,
        "pixelwise_flow_predictor": model.flow_predictor.pixelwise_flow_predictor,
    }
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("estimator", ["mraa", "correlation"])
def test_frozen_motion_keeps_the_flow_while_the_rest_learns(estimator: str):
    model = LatentFlowAutoEncoder(tiny_cfg(motion_estimator=estimator)).eval()
    model.flow_predictor.freeze_motion()
    source, driving = frames(), frames()
    with torch.no_grad():
        before = model(source, driving)
    model.train()  # must leave F's motion in eval mode, or BatchNorm statistics would move the flow
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    decoder, occlusion = (
        model.decoder.final.weight.clone(),
        model.flow_predictor.pixelwise_flow_predictor.occlusion.weight.clone(),
    )
    for _ in range(2):
        optimizer.zero_grad()
        (model(source, driving)["prediction"].mean() + model(source, driving)["occlusion"].mean()).backward()
        optimizer.step()
    with torch.no_grad():
        after = model.eval()(source, driving)
    torch.testing.assert_close(after["flow"], before["flow"], rtol=0, atol=0)
    assert not torch.equal(after["occlusion"], before["occlusion"])
    assert not torch.equal(model.decoder.final.weight, decoder)
    assert not torch.equal(model.flow_predictor.pixelwise_flow_predictor.occlusion.weight, occlusion)
    frozen = {id(q) for m in model.flow_predictor.motion_modules() for q in m.parameters()}
    assert frozen and frozen.isdisjoint(id(q) for q in trainable)


def test_eval_under_no_grad():
    model = LatentFlowAutoEncoder(tiny_cfg()).eval()
    source, driving = frames(), frames()
    stats = model.encoder.stem[1].running_mean.clone()
    with torch.no_grad():
        first, second = model(source, driving), model(source, driving)
    assert first["prediction"].grad_fn is None
    assert torch.isfinite(first["prediction"]).all()
    torch.testing.assert_close(first["prediction"], second["prediction"])
    torch.testing.assert_close(model.encoder.stem[1].running_mean, stats)


def test_diffusion_tensor_round_trips():
    from lfdm.models.warp import from_diffusion_tensor, identity_grid, to_diffusion_tensor

    grid = identity_grid(6, 6).expand(2, 3, 6, 6, 2).clone()
    grid[:, 1:, ..., 0] += 0.25  # frames 1 and 2 sample a quarter-frame to the right
    occlusion = torch.rand(2, 3, 1, 6, 6)
    x = to_diffusion_tensor(grid, occlusion)
    assert x.shape == (2, 3, 3, 6, 6) and torch.allclose(x[:, 2], occlusion[:, :, 0] * 2 - 1)
    back_grid, back_occlusion = from_diffusion_tensor(x)
    torch.testing.assert_close(back_grid, grid)
    torch.testing.assert_close(back_occlusion, occlusion)
