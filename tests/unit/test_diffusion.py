"""FlowDiffusion: schedule, loss, null dropout, samplers, guidance and dynamic thresholding (tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfdm.config import DiffusionConfig, SamplerConfig
from lfdm.diffusion import DISPLACEMENT_QUANTILE, FlowDiffusion, make_scheduler
from lfdm.models.warp import identity_grid

CZ, D = 4, 6  # latent (cond) channels, text embedding size
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")


class TinyDenoiser(nn.Module):
    """A small conditional ε-net: depends on x, t, cond and the (droppable) text embedding, nonlinearly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3 + CZ, 3, 3, padding=1)
        self.text = nn.Linear(D, 3)

    def forward(self, x, t, cond, text_emb, drop_text=None):
        if drop_text is not None:
            text_emb = text_emb.masked_fill(drop_text[:, None], 0.0)  # zero null embedding
        z = cond[:, :, None].expand(-1, -1, x.shape[2], -1, -1)
        h = self.conv(torch.cat([x, z], 1)) + self.text(text_emb)[:, :, None, None, None]
        return torch.tanh(h + torch.sin(t.float() / 7)[:, None, None, None, None])


class PerfectDenoiser(nn.Module):
    """Knows x0, so it returns the exact ε = (x_t − √ᾱ x0) / √(1−ᾱ) for whatever x_t it is given, or the
    exact v = √ᾱ ε − √(1−ᾱ) x0."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "epsilon") -> None:
        super().__init__()
        self.x0, self.alphas_cumprod, self.prediction = x0, alphas_cumprod, prediction

    def forward(self, x, t, cond, text_emb, drop_text=None):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


class ZeroDenoiser(nn.Module):
    def forward(self, x, t, cond, text_emb, drop_text=None):
        return torch.zeros_like(x)


class Recorder(nn.Module):
    """Counts calls and records each call's batch size and ``drop_text``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, cond, text_emb, drop_text=None):
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        self.calls.append((x.shape[0], drop_text.clone()))
        return self.inner(x, t, cond, text_emb, drop_text)


def inputs(b: int = 2, h: int = 6, w: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, CZ, h, w), torch.randn(b, D)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perfect_diffusion(x0: torch.Tensor, cfg: DiffusionConfig) -> FlowDiffusion:
    diffusion = FlowDiffusion(nn.Identity(), cfg)
    diffusion.denoiser = PerfectDenoiser(diffusion.to_target(x0), diffusion.alphas_cumprod, cfg.prediction)
    return diffusion


def moving_flows(n: int, k: int = 3, h: int = 6, w: int = 5, motion: float = 0.05) -> torch.Tensor:
    """Flow tensors: the identity grid displaced by up to ``motion``, occlusion channel in [-1, 1]."""
    grid = identity_grid(h, w).permute(2, 0, 1)[:, None] + motion * (torch.rand(n, 2, k, h, w) * 2 - 1)
    return torch.cat((grid, torch.rand(n, 1, k, h, w) * 2 - 1), dim=1)


# ------------------------------------------------------------------------------------------ schedule


def test_cosine_schedule_matches_closed_form() -> None:
    T, s = 1000, 0.008
    a = FlowDiffusion(nn.Identity(), DiffusionConfig(timesteps=T)).alphas_cumprod.double()
    assert (a.diff() < 0).all() and a[0] > 0.999 and a[-1] < 1e-3

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # diffusers' index t is continuous time (t+1)/T; ᾱ = f(t)/f(0) until the 0.999 β cap bites at t = T−1
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    closed = f(u) / f(torch.zeros(()))
    torch.testing.assert_close(a[:-1], closed[:-1], rtol=1e-5, atol=0)  # float32 cumprod error
    # the product form with the cap holds everywhere, including the capped last step
    betas = (1 - f(u) / f(u - 1 / T)).clamp(max=0.999)
    torch.testing.assert_close(a, torch.cumprod(1 - betas, 0), rtol=1e-4, atol=0)
    assert betas[-1] == 0.999 and (betas[:-1] < 0.999).all()


def test_alphas_cumprod_is_a_non_persistent_buffer() -> None:
    diffusion = FlowDiffusion(TinyDenoiser(), DiffusionConfig(timesteps=50))
    assert "alphas_cumprod" in dict(diffusion.named_buffers())
    assert not any("alphas_cumprod" in k for k in diffusion.state_dict())
    torch.testing.assert_close(diffusion.alphas_cumprod, diffusion.scheduler.alphas_cumprod)


def test_add_noise_is_inverted_by_the_true_noise() -> None:
    diffusion = FlowDiffusion(nn.Identity(), DiffusionConfig(prediction="epsilon"))
    x0, noise = torch.randn(4, 3, 2, 4, 4), torch.randn(4, 3, 2, 4, 4)
    t = torch.tensor([0, 1, 500, 998])
    x_t = diffusion.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, diffusion.scheduler.add_noise(x0, noise, t))
    for i in range(len(t)):  # diffusers' x̂0 from the true ε gives x0 back (error grows as 1/√ᾱ_t)
        x0_hat = diffusion.scheduler.step(noise[i : i + 1], t[i], x_t[i : i + 1]).pred_original_sample
        torch.testing.assert_close(x0_hat, x0[i : i + 1], atol=2e-4, rtol=0)


# -------------------------------------------------------------------------------------------- target


@pytest.mark.parametrize("span", [1.0, 2.0])
def test_displacement_target_is_scaled_to_its_range_and_inverts(span: float) -> None:
    flows = moving_flows(16, motion=0.05)
    cfg = DiffusionConfig(target="displacement", displacement_range=span)
    diffusion = FlowDiffusion(nn.Identity(), cfg)
    scale = diffusion.fit_target(flows)
    assert 0.04 < scale * span <= 0.05  # the 0.995-quantile of a uniform displacement in [-0.05, 0.05]
    target = diffusion.to_target(flows)
    inside = (target[:, :2].abs() <= span).float().mean()
    torch.testing.assert_close(inside, torch.tensor(DISPLACEMENT_QUANTILE), atol=2e-3, rtol=0)
    torch.testing.assert_close(target[:, 2:], flows[:, 2:])  # occlusion is untouched
    torch.testing.assert_close(diffusion.from_target(target), flows, atol=1e-6, rtol=0)
    # the scale is saved with the weights
    restored = FlowDiffusion(nn.Identity(), cfg)
    restored.load_state_dict(diffusion.state_dict())
    torch.testing.assert_close(restored.to_target(flows), target)


def test_grid_target_is_the_flow_tensor_itself() -> None:
    flows = moving_flows(4)
    diffusion = FlowDiffusion(nn.Identity(), DiffusionConfig(target="grid"))
    assert diffusion.fit_target(flows) == 1
    assert diffusion.to_target(flows) is flows and diffusion.from_target(flows) is flows


def test_still_flows_are_refused() -> None:
    still = moving_flows(4, motion=0.0)
    with pytest.raises(ValueError, match="do not move"):
        FlowDiffusion(nn.Identity(), DiffusionConfig(target="displacement")).fit_target(still)


# the unit range with dynamic thresholding (which may shrink the top 0.5 % of displacements a little), and
# the default range without it
RANGE_SETTINGS = [{"displacement_range": 1.0, "threshold_percentile": 0.9}, {}]


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("range_settings", RANGE_SETTINGS)
def test_perfect_predictor_samples_displacement_flows_back(kind: str, range_settings: dict) -> None:
    flows = moving_flows(2, motion=0.05)
    diffusion = perfect_diffusion(flows, DiffusionConfig(timesteps=100, **range_settings))
    diffusion.fit_target(flows)
    diffusion.denoiser.x0 = diffusion.to_target(flows)  # the scale changed what the model sees
    cond, text = inputs(2, 6, 5)
    out = diffusion.sample(cond, text, num_frames=3, sampler=SamplerConfig(sampler=kind, steps=10))
    assert (out - flows).abs().max() < 0.05 * 0.2 and (out - flows).abs().median() < 1e-4


# ---------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_zero_for_a_perfect_predictor_and_one_for_zero(prediction: str) -> None:
    cfg = DiffusionConfig(timesteps=100, prediction=prediction, target="grid")
    x0 = torch.randn(8, 3, 4, 8, 8)  # unit variance: E[v²] = ᾱ + (1 − ᾱ) = 1 as E[ε²] = 1
    cond, text = inputs(8, 8, 8)
    assert perfect_diffusion(x0, cfg).loss(x0, cond, text) < 1e-8
    zero = FlowDiffusion(ZeroDenoiser(), cfg)
    assert abs(zero.loss(x0, cond, text).item() - 1) < 0.1


def test_loss_is_finite_and_backpropagates() -> None:
    diffusion = FlowDiffusion(TinyDenoiser(), DiffusionConfig(timesteps=100))
    cond, text = inputs()
    loss = diffusion(torch.randn(2, 3, 3, 6, 5), cond, text)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss >= 0
    loss.backward()
    grads = [p.grad for p in diffusion.denoiser.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_loss_is_reproducible_with_a_generator() -> None:
    diffusion = FlowDiffusion(TinyDenoiser(), DiffusionConfig(timesteps=100))
    x0, (cond, text) = torch.randn(2, 3, 3, 6, 5), inputs()
    first = diffusion.loss(x0, cond, text, generator=seeded(3))
    assert torch.equal(first, diffusion.loss(x0, cond, text, generator=seeded(3)))
    assert not torch.equal(first, diffusion.loss(x0, cond, text, generator=seeded(4)))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weighting_scales_each_samples_error(prediction: str) -> None:
    cfg = DiffusionConfig(timesteps=100, prediction=prediction, target="grid", min_snr_gamma=5.0)
    diffusion = FlowDiffusion(ZeroDenoiser(), cfg)
    x0, (cond, text) = torch.randn(6, 3, 3, 6, 5), inputs(6)
    loss = diffusion.loss(x0, cond, text, generator=seeded(3))
    generator = seeded(3)  # the loss draws t, then ε, from its generator
    t = torch.randint(0, 100, (6,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    target = noise if prediction == "epsilon" else diffusion.velocity(x0, noise, t)
    a = diffusion.alphas_cumprod[t]
    snr = a / (1 - a)
    weight = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction == "epsilon" else snr + 1)
    torch.testing.assert_close(loss, (target.square().flatten(1).mean(1) * weight).mean())
    every = diffusion.min_snr_weight(torch.arange(100))
    assert every.max() <= 1 and every[0] < 0.1  # the easy low-noise steps count less


@pytest.mark.parametrize(("p", "lo", "hi"), [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.5, 0.4, 0.6)])
def test_null_condition_dropout_rate(p: float, lo: float, hi: float) -> None:
    recorder = Recorder(TinyDenoiser())
    diffusion = FlowDiffusion(recorder, DiffusionConfig(timesteps=10, null_prob=p))
    x0, (cond, text) = torch.randn(8, 3, 2, 4, 4), inputs(8, 4, 4)
    with torch.no_grad():
        for _ in range(50):
            diffusion.loss(x0, cond, text)
    dropped = torch.cat([drop for _, drop in recorder.calls]).float().mean().item()
    assert lo <= dropped <= hi


# ------------------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("kind", SAMPLERS)
def test_samplers_return_finite_flow_of_the_right_shape(kind: str) -> None:
    recorder = Recorder(TinyDenoiser())
    diffusion = FlowDiffusion(recorder, DiffusionConfig(timesteps=20))
    cond, text = inputs(2, 6, 5)
    out = diffusion.sample(cond, text, num_frames=3, sampler=SamplerConfig(sampler=kind, steps=4, guidance=2))
    assert out.shape == (2, 3, 3, 6, 5) and torch.isfinite(out).all()
    # DDPM is ancestral over all training steps whatever `steps` says
    assert len(recorder.calls) == (20 if kind == "ddpm" else 4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", SAMPLERS)
def test_perfect_predictor_is_sampled_back_to_x0(kind: str, prediction: str) -> None:
    x0 = torch.rand(2, 3, 3, 6, 5) * 1.8 - 0.9  # inside [-1, 1]: dynamic thresholding would be a no-op
    cond, text = inputs(2, 6, 5)
    cfg = DiffusionConfig(timesteps=100, prediction=prediction, threshold_percentile=0.9, target="grid")
    out = perfect_diffusion(x0, cfg).sample(
        cond, text, num_frames=3, sampler=SamplerConfig(sampler=kind, steps=10)
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_dynamic_thresholding_follows_the_official_rule(kind: str) -> None:
    x0 = torch.randn(2, 3, 3, 6, 5)
    q = torch.quantile(x0.abs().flatten(1), 0.9, dim=1)
    x0 = x0 * torch.tensor([2.0, 0.5]).div(q).view(2, 1, 1, 1, 1)  # 0.9-quantiles of |x0|: 2 and 0.5
    s = torch.quantile(x0.abs().flatten(1), 0.9, dim=1).clamp(min=1).view(2, 1, 1, 1, 1)  # max(1, q)
    torch.testing.assert_close(s.flatten(), torch.tensor([2.0, 1.0]))
    expected = torch.maximum(torch.minimum(x0, s), -s) / s
    assert (expected[0] != x0[0]).any()  # sample 0 really is rescaled

    cond, text = inputs(2, 6, 5)
    sampler = SamplerConfig(sampler=kind, steps=10)
    on = DiffusionConfig(timesteps=100, threshold_percentile=0.9, target="grid")
    out = perfect_diffusion(x0, on).sample(cond, text, num_frames=3, sampler=sampler)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)

    # percentile 1.0 turns thresholding off, and no static clipping takes its place
    off = DiffusionConfig(timesteps=100, threshold_percentile=1.0, target="grid")
    out = perfect_diffusion(x0, off).sample(cond, text, num_frames=3, sampler=sampler)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kind", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("sde-dpmsolver++", 0.0)]
)
def test_sampling_is_reproducible_with_a_seed(kind: str, eta: float) -> None:
    diffusion = FlowDiffusion(TinyDenoiser(), DiffusionConfig(timesteps=20))
    cond, text = inputs()
    sampler = SamplerConfig(sampler=kind, steps=5, eta=eta)

    def run(seed: int) -> torch.Tensor:
        return diffusion.sample(cond, text, num_frames=2, sampler=sampler, generator=seeded(seed))

    first = run(0)
    torch.randn(10)  # move the global RNG: only the generator may matter
    assert torch.equal(first, run(0))
    assert not torch.allclose(first, run(1))


def test_ddim_eta_reaches_the_scheduler() -> None:
    # η = 0 draws no noise after x_T; η = 1 does, so the same start noise ends elsewhere
    diffusion = FlowDiffusion(TinyDenoiser(), DiffusionConfig(timesteps=20))
    cond, text = inputs()
    ddim, stochastic = (
        diffusion.sample(
            cond, text, num_frames=2, sampler=SamplerConfig(steps=5, eta=eta), generator=seeded(0)
        )
        for eta in (0.0, 1.0)
    )
    assert not torch.allclose(ddim, stochastic)


@pytest.mark.parametrize(
    ("spacing", "grid"),
    [("leading", [80, 60, 40, 20, 0]), ("trailing", [99, 79, 59, 39, 19]), ("linspace", [99, 74, 50, 25, 0])],
)
def test_ddim_timestep_spacing_sets_the_grid(spacing: str, grid: list[int]) -> None:
    scheduler = make_scheduler(
        SamplerConfig(steps=5, timestep_spacing=spacing), DiffusionConfig(timesteps=100)
    )
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == grid


# ------------------------------------------------------------------------------------------ guidance


@torch.no_grad()
def reference_ddim(
    denoiser: nn.Module, cfg: DiffusionConfig, sampler: SamplerConfig, cond, text, frames: int, seed: int
) -> torch.Tensor:
    """Eq. 4 by hand: separate conditional and null calls, combined as ε(∅) + g·(ε(y) − ε(∅))."""
    b, (h, w) = cond.shape[0], cond.shape[-2:]
    gen = seeded(seed)
    scheduler = make_scheduler(sampler, cfg)
    scheduler.set_timesteps(sampler.steps)
    x = torch.randn((b, 3, frames, h, w), generator=gen)
    for t in scheduler.timesteps:
        tb = t.expand(b)
        eps_cond = denoiser(x, tb, cond, text, torch.zeros(b, dtype=torch.bool))
        eps_null = denoiser(x, tb, cond, text, torch.ones(b, dtype=torch.bool))
        eps = eps_null + sampler.guidance * (eps_cond - eps_null)
        x = scheduler.step(eps, t, x, eta=sampler.eta, generator=gen).prev_sample
    return x


@pytest.mark.parametrize(
    ("g", "drops"), [(1.0, [False, False]), (0.0, [True, True]), (2.0, [False, False, True, True])]
)
def test_guidance_batches_rows_and_combines_them(g: float, drops: list[bool]) -> None:
    # g = 1: conditional rows only; g = 0: null rows only; otherwise both, stacked in one call per step
    denoiser, cfg, steps = TinyDenoiser(), DiffusionConfig(timesteps=30, target="grid"), 3
    recorder = Recorder(denoiser)
    cond, text = inputs(2, 6, 5)
    sampler = SamplerConfig(sampler="ddim", steps=steps, guidance=g)
    out = FlowDiffusion(recorder, cfg).sample(cond, text, num_frames=2, sampler=sampler, generator=seeded(7))

    assert len(recorder.calls) == steps
    assert all(n == len(drops) and drop.tolist() == drops for n, drop in recorder.calls)
    expected = reference_ddim(denoiser, cfg, sampler, cond, text, frames=2, seed=7)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_guidance_changes_the_sample() -> None:
    diffusion = FlowDiffusion(TinyDenoiser(), DiffusionConfig(timesteps=30))
    cond, text = inputs()
    outs = [
        diffusion.sample(
            cond, text, num_frames=2, sampler=SamplerConfig(steps=3, guidance=g), generator=seeded(0)
        )
        for g in (0.0, 1.0, 2.0)
    ]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_sampling_leaves_no_autograd_graph() -> None:
    diffusion = FlowDiffusion(TinyDenoiser(), DiffusionConfig(timesteps=10))
    cond, text = inputs()
    out = diffusion.sample(cond, text, num_frames=2, sampler=SamplerConfig(steps=2))
    assert not out.requires_grad and out.is_inference()
