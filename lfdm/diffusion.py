"""Stage two: Gaussian diffusion over latent flow (paper Sec. 3.1, 3.2.2, 4.2).

The flow tensor ``x0 (B, 3, K, H, W)`` is the flow grid plus occlusion (``lfdm.models.warp``). With
``target: grid`` it is diffused as it is (paper, official code); with ``target: displacement`` the grid
channels become the displacement from the identity grid over a scale measured on the training flows, so
the model starts from "no motion" instead of having to learn the identity grid, and the motion, a few
hundredths of the grid's range, fills about all of [-1, 1]. Training is
ε-prediction with an L2 loss (Eq. 7; ``prediction: v_prediction`` regresses v = √ᾱ ε − √(1−ᾱ) x0 instead,
Salimans & Ho 2022) and null-condition dropout; sampling runs one of diffusers' schedulers
with classifier-free guidance (Eq. 4) and Imagen's dynamic thresholding of x̂0, as the official code does.
Schedule math lives in diffusers; this module owns the loss and the sampling loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from torch import nn
from tqdm.auto import tqdm

from lfdm.checkpoint import load_checkpoint, save_checkpoint
from lfdm.config import DiffusionConfig, DMConfig, SamplerConfig
from lfdm.models.unet3d import Unet3D
from lfdm.models.warp import identity_grid

# DPM-Solver's authors clip the cosine schedule's half-log-SNR λ at −5.1 (LuChengTHU/dpm-solver): λ → −∞
# over its last discrete steps, and one huge first step in λ destabilises the multistep solver. This drops
# 4 of 1000 steps, all with ᾱ < 4e-5, so starting from pure noise is still consistent.
DPM_SOLVER_LAMBDA_MIN = -5.1
# target "displacement": this quantile of |displacement| over the training flows maps to
# `displacement_range`, so about all of the motion lies within ± that range
DISPLACEMENT_QUANTILE = 0.995
QUANTILE_MAX_VALUES = 1 << 24  # torch.quantile's input limit; a strided subset beyond it

Scheduler = DDIMScheduler | DDPMScheduler | DPMSolverMultistepScheduler


class Denoiser(Protocol):
    """ε_θ: ``x (B, 3, K, H, W)``, ``t (B,)`` long, ``cond (B, Cz, H, W)``, ``text_emb (B, D)`` and
    ``drop_text (B,)`` bool (True → that row uses the null embedding) → ``ε (B, 3, K, H, W)``."""

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        text_emb: torch.Tensor,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def make_scheduler(sampler: SamplerConfig, cfg: DiffusionConfig) -> Scheduler:
    """A fresh sampling scheduler (they keep per-run state) on the training schedule of ``cfg``.

    ``"ddpm"`` is ancestral sampling over all ``cfg.timesteps`` steps (the official default); it ignores
    ``sampler.steps``, since skipping steps is what DDIM and DPM-Solver++ are for. ``"ddim"`` uses
    ``sampler.steps`` steps on the ``sampler.timestep_spacing`` grid with η = ``sampler.eta`` (passed to
    ``step``); ``"dpmsolver++"`` is the second-order multistep DPM-Solver++ with ``sampler.steps`` steps,
    ``"sde-dpmsolver++"`` its stochastic (SDE) form, k-diffusion's DPM++ 2M SDE, which draws fresh noise
    each step as DDPM does.

    All of them apply dynamic thresholding (Imagen) to x̂0 unless ``cfg.threshold_percentile == 1``, in which
    case x̂0 is neither thresholded nor clipped.
    """
    common: dict[str, Any] = {
        "num_train_timesteps": cfg.timesteps,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction,
        "thresholding": cfg.threshold_percentile < 1,
        "dynamic_thresholding_ratio": cfg.threshold_percentile,
        # diffusers takes s = clamp(quantile_p(|x̂0|), 1, sample_max_value), then x̂0 = clamp(x̂0, −s, s) / s
        # per sample. The official rule is s = max(1, quantile_p), i.e. no upper bound; the default 1.0
        # would pin s to 1 and turn it into static clipping to [-1, 1].
        "sample_max_value": float("inf"),
    }
    if sampler.sampler == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    if sampler.sampler == "ddim":
        return DDIMScheduler(
            **common,
            clip_sample=False,
            # "trailing" starts at t = T−1 (ᾱ ≈ 0, matching the pure-noise start): 999, 899, ..., 99 for 10
            # steps; "leading" starts at T − T/steps and ends at 0, nearest the official ddim_sample's grid
            # (909 ... 90 → x̂0 for 10 steps), and gave lower FVD on every model and seed measured here
            timestep_spacing=sampler.timestep_spacing,
            # ᾱ_prev = 1 after the last step, so the output is the final (thresholded) x̂0, as officially.
            set_alpha_to_one=True,
        )
    return DPMSolverMultistepScheduler(
        **common,
        algorithm_type=sampler.sampler,
        solver_order=2,  # the order recommended for guided sampling
        final_sigmas_type="zero",  # the last step lands on σ = 0, i.e. returns x̂0
        lambda_min_clipped=DPM_SOLVER_LAMBDA_MIN,
        timestep_spacing="linspace",  # exactly `steps` steps from the clipped end; "trailing" may drop some
    )


class FlowDiffusion(nn.Module):
    """Wraps a :class:`Denoiser` module ε_θ with the training loss and the samplers; adds no weights."""

    alphas_cumprod: torch.Tensor
    displacement_scale: torch.Tensor

    def __init__(self, denoiser: nn.Module, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.cfg = cfg
        self.scheduler = DDPMScheduler(
            num_train_timesteps=cfg.timesteps,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction,
            clip_sample=False,
        )
        # a buffer, so ᾱ follows .to(device) and the loss never copies the table per step
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)
        # saved with the weights: the scale is part of what the model learnt (fit_target)
        self.register_buffer("displacement_scale", torch.ones(()))

    @torch.no_grad()
    def fit_target(self, flows: torch.Tensor) -> float:
        """Set the displacement scale from training flow tensors ``(N, 3, K, H, W)``, so that their
        0.995-quantile of |displacement| becomes ``cfg.displacement_range``; returns it (1 for ``target: grid``)."""
        if self.cfg.target == "displacement":
            magnitude = self._displacement(flows.float()).abs().flatten()
            stride = -(-magnitude.numel() // QUANTILE_MAX_VALUES)
            scale = torch.quantile(magnitude[::stride], DISPLACEMENT_QUANTILE)
            if not scale > 0:
                raise ValueError("the training flows do not move: their displacement scale is 0")
            self.displacement_scale.fill_(scale / self.cfg.displacement_range)
        return float(self.displacement_scale)

    def to_target(self, x: torch.Tensor) -> torch.Tensor:
        """Flow tensor → the tensor the model diffuses (the same for ``target: grid``)."""
        if self.cfg.target == "grid":
            return x
        return torch.cat((self._displacement(x) / self.displacement_scale.to(x.dtype), x[:, 2:]), dim=1)

    def from_target(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_target`."""
        if self.cfg.target == "grid":
            return x
        grid = x[:, :2] * self.displacement_scale.to(x.dtype) + self._identity(x)
        return torch.cat((grid, x[:, 2:]), dim=1)

    @staticmethod
    def _identity(x: torch.Tensor) -> torch.Tensor:
        """The identity grid ``(2, 1, H, W)`` to broadcast over ``x (B, 3, K, H, W)``'s grid channels."""
        return identity_grid(*x.shape[-2:], device=x.device, dtype=x.dtype).permute(2, 0, 1)[:, None]

    def _displacement(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] - self._identity(x)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0): ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` for ``x0, noise (B, ...)`` and ``t (B,)`` long."""
        a = self._alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(
        self,
        x0: torch.Tensor,
        cond: torch.Tensor,
        text_emb: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Eq. 7: ``‖ε − ε_θ(x_t, t, z0, y)‖²`` averaged (v in place of ε for v-prediction; each sample
        weighted by :meth:`min_snr_weight` when ``cfg.min_snr_gamma`` is set), for ``x0 (B, 3, K, H, W)``, ``cond (B, Cz, H, W)``,
        ``text_emb (B, D)``. Each row's text is dropped to the null embedding with prob ``cfg.null_prob``.
        ``generator`` (on ``x0``'s device) makes t, ε and the dropout reproducible."""
        x0 = self.to_target(x0)
        b, device = x0.shape[0], x0.device
        t = torch.randint(0, self.cfg.timesteps, (b,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        drop = torch.rand(b, generator=generator, device=device) < self.cfg.null_prob
        pred = self.denoiser(self.add_noise(x0, noise, t), t, cond, text_emb, drop)
        target = noise if self.cfg.prediction == "epsilon" else self.velocity(x0, noise, t)
        if self.cfg.min_snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (per_sample * self.min_snr_weight(t)).mean()

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights ``(B,)``: min(SNR_t, γ) / SNR_t for ε-prediction, / (SNR_t + 1) for v-prediction
        (the same weight on x̂0's error in both)."""
        a = self.alphas_cumprod[t].float()
        snr = a / (1 - a)
        return snr.clamp(max=self.cfg.min_snr_gamma) / (snr if self.cfg.prediction == "epsilon" else snr + 1)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t ε − √(1−ᾱ_t) x0, the v-prediction target."""
        a = self._alpha_bar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t ``(B,)`` shaped to broadcast over ``like (B, ...)``."""
        return self.alphas_cumprod[t].to(like.dtype).view(-1, *(1,) * (like.ndim - 1))

    forward = loss  # so DistributedDataParallel, which hooks forward, can wrap this module

    @torch.inference_mode()
    def sample(
        self,
        cond: torch.Tensor,
        text_emb: torch.Tensor,
        *,
        num_frames: int,
        sampler: SamplerConfig,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate ``x0 (B, 3, K=num_frames, H, W)`` from ``cond (B, Cz, H, W)`` and ``text_emb (B, D)``.

        Classifier-free guidance (Eq. 4): ``ε̂ = ε(∅) + g·(ε(y) − ε(∅))`` with ``g = sampler.guidance``, the
        conditional and null rows stacked into one denoiser call per step; g = 1 runs only the conditional
        rows and g = 0 only the null rows. ``generator`` must live on ``cond``'s device; it draws the start
        noise and the scheduler's per-step noise (DDPM, DDIM with η > 0, SDE-DPM-Solver++), so a seed fixes the output.
        """
        b, (h, w) = cond.shape[0], cond.shape[-2:]
        scheduler = make_scheduler(sampler, self.cfg)
        scheduler.set_timesteps(self.cfg.timesteps if sampler.sampler == "ddpm" else sampler.steps)
        g = sampler.guidance
        null_rows = (True,) if g == 0 else (False,) if g == 1 else (False, True)
        n = len(null_rows)
        drop = torch.tensor(null_rows, device=cond.device).repeat_interleave(b)
        cond_in, text_in = cond.repeat(n, *(1,) * (cond.ndim - 1)), text_emb.repeat(n, 1)
        step_kwargs: dict[str, Any] = {"generator": generator, "return_dict": False}  # → (new sample, ...)
        if isinstance(scheduler, DDIMScheduler):
            step_kwargs["eta"] = sampler.eta

        x = torch.randn((b, 3, num_frames, h, w), generator=generator, device=cond.device, dtype=cond.dtype)
        # The scheduler's timesteps stay on the host: diffusers branches on them in Python (`if t > 0`),
        # which would sync with the device every step if they lived there. The denoiser gets a device copy.
        timesteps = scheduler.timesteps
        steps = tqdm(timesteps, desc="sampling", disable=not progress)
        for t, t_dev in zip(steps, timesteps.to(cond.device), strict=True):
            out = self.denoiser(x.repeat(n, 1, 1, 1, 1), t_dev.expand(n * b), cond_in, text_in, drop)
            if n == 2:  # guidance is linear in x_t, so it combines ε and v predictions alike
                out_cond, out_null = out.chunk(2)
                out = out_null + g * (out_cond - out_null)
            # diffusers annotates `timestep: int`, though its own pipelines pass these tensors as we do
            x = scheduler.step(out, t, x, **step_kwargs)[0]  # pyright: ignore[reportArgumentType]
        return self.from_target(x)


def save_dm(
    path: str | Path,
    diffusion: FlowDiffusion,
    cfg: DMConfig,
    *,
    cond_channels: int,
    text_dim: int,
    num_frames: int,
    latent_size: int,
    step: int,
) -> None:
    save_checkpoint(
        path,
        model=diffusion.state_dict(),
        config=cfg.model_dump(mode="json"),
        cond_channels=cond_channels,
        text_dim=text_dim,
        num_frames=num_frames,
        latent_size=latent_size,
        step=step,
    )


def load_dm(path: str | Path, device: torch.device) -> tuple[FlowDiffusion, dict[str, Any]]:
    """The diffusion model (3D U-Net inside) in eval mode on ``device``, and the checkpoint's metadata."""
    ckpt = load_checkpoint(path)
    # models saved before the key existed were fitted to the unit range
    ckpt["config"]["diffusion"].setdefault("displacement_range", 1.0)
    cfg = DMConfig.model_validate(ckpt["config"])
    denoiser = Unet3D(
        cfg.unet,
        cond_channels=ckpt["cond_channels"],
        text_dim=ckpt["text_dim"],
        latent_size=ckpt["latent_size"],
    )
    diffusion = FlowDiffusion(denoiser, cfg.diffusion)
    diffusion.load_state_dict(ckpt.pop("model"))
    return diffusion.to(device).eval(), ckpt
