"""Both networks can learn: each fits one example, its loss falling by a stated factor in a bounded
number of steps (tiny configs, CPU, seconds)."""

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.transform import resize
from tiny import tiny_params

from lfdm.config import DiffusionConfig, EquivarianceConfig, PerceptualConfig, UNetConfig
from lfdm.diffusion import FlowDiffusion
from lfdm.losses import PerceptualLoss, lfae_loss
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.unet3d import Unet3D

TINY_LFAE = tiny_params().lfae


def photo(size: int) -> torch.Tensor:
    image = resize(skdata.astronaut()[:300, 100:400], (size, size), anti_aliasing=True)
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)


def test_lfae_learns_to_reconstruct_a_shifted_frame_pair():
    source = photo(32)[None]
    driving = torch.roll(source, shifts=(2, 3), dims=(2, 3))  # the camera moved by a few pixels
    model = LatentFlowAutoEncoder(TINY_LFAE)
    perceptual = PerceptualLoss(PerceptualConfig(scales=(1.0, 0.5)))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        out = model(source, driving)
        loss = lfae_loss(
            out["prediction"],
            driving,
            model.flow_predictor.region_predictor,
            out["driving_regions"],
            perceptual,
            EquivarianceConfig(weight=0.0),
        )["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) / 3, losses[::10]


def test_diffusion_model_fits_one_flow_sequence():
    torch.manual_seed(0)
    cfg = UNetConfig(dim=16, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8)
    diffusion = FlowDiffusion(
        Unet3D(cfg, cond_channels=4, text_dim=6, latent_size=8),
        DiffusionConfig(null_prob=0.0, prediction="epsilon", target="grid"),
    )
    x0 = torch.tanh(torch.randn(1, 3, 4, 8, 8)).expand(
        8, -1, -1, -1, -1
    )  # one sequence, batch of 8 noise draws
    cond, text = torch.randn(8, 4, 8, 8), torch.randn(1, 6).expand(8, -1)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = diffusion.loss(x0, cond, text, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # untrained ε-prediction MSE is ≈ 1 (the zero-initialised head predicts 0); fitted, it must fall 4×
    assert np.mean(losses[:10]) == pytest.approx(1.0, abs=0.3)
    assert np.mean(losses[-20:]) < np.mean(losses[:10]) / 4, losses[::15]
