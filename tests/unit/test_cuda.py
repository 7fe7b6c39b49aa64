"""Smoke test on CUDA (skipped without it): a tiny diffusion model trains a few steps through the training
loop and samples, in fp32 and under bf16 autocast, all on the GPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from lfdm.config import DiffusionConfig, SamplerConfig, UNetConfig
from lfdm.diffusion import FlowDiffusion
from lfdm.models.unet3d import Unet3D
from lfdm.models.warp import identity_grid
from lfdm.training import TrainingState, adam, fit, lr_schedule, sharded_loader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch sees no CUDA device"),
]
K, SIDE, COND, TEXT = 4, 8, 5, 6


class RandomFlows(Dataset):
    """Flow sequences that move a little away from the identity grid, with random conditions."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        grid = identity_grid(SIDE, SIDE).permute(2, 0, 1)[:, None].expand(2, K, SIDE, SIDE)
        flow = grid + 0.05 * torch.randn(2, K, SIDE, SIDE, generator=g)
        occlusion = torch.rand(1, K, SIDE, SIDE, generator=g)
        return {"x0": torch.cat([flow, occlusion]), "z0": torch.randn(COND, SIDE, SIDE, generator=g),
                "text": torch.randn(TEXT, generator=g)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_and_sampling_run_on_cuda(tmp_path: Path, precision: str) -> None:
    device = torch.device("cuda")
    unet = Unet3D(UNetConfig(dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8),
                  cond_channels=COND, text_dim=TEXT, latent_size=SIDE)
    diffusion = FlowDiffusion(unet, DiffusionConfig(timesteps=50))
    data = RandomFlows()
    diffusion.fit_target(torch.stack([data[i]["x0"] for i in range(len(data))]))
    diffusion.to(device).train()
    optimizer = adam(diffusion.parameters(), 1e-3, (0.9, 0.99))
    state = TrainingState(tmp_path / "state.pt", diffusion, optimizer, lr_schedule(optimizer, "linear", 3, (), 1.0), {})
    loader = sharded_loader(data, 4, "batch_size", seed=0, num_workers=0, generator=torch.Generator())

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        return {"diffusion": diffusion(batch["x0"], batch["z0"], batch["text"])}

    fit("cuda", state, loader, loss, SimpleNamespace(steps=3, log_every=1, checkpoint_every=2),
        objective="diffusion", device=device, precision=precision, grad_clip=1.0)
    assert state.step == 3 and all(p.is_cuda for p in diffusion.parameters())

    diffusion.eval()
    batch = next(iter(loader))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        flows = diffusion.sample(batch["z0"].to(device), batch["text"].to(device), num_frames=K,
                                 sampler=SamplerConfig(sampler="ddim", steps=2),
                                 generator=torch.Generator(device).manual_seed(0))
    assert flows.is_cuda and flows.shape == (4, 3, K, SIDE, SIDE) and torch.isfinite(flows).all()
