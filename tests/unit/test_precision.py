"""Devices and precisions: a tiny diffusion model trains a few steps through the training loop and samples on
CUDA (fp32 and bf16; skipped without CUDA) and in bf16 on a CPU with native bf16 (skipped on others, which
refuse it); the warp's grid stays fp32 under autocast."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from lfdm import device as lfdm_device
from lfdm.config import DiffusionConfig, ParamsError, SamplerConfig, UNetConfig
from lfdm.device import autocast, cpu_has_native_bf16, resolve_precision
from lfdm.diffusion import FlowDiffusion
from lfdm.models.unet3d import Unet3D
from lfdm.models.warp import identity_grid, warp
from lfdm.training import TrainingState, adam, fit, lr_schedule, sharded_loader

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch sees no CUDA device")
needs_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no AMX or AVX512-BF16: bf16 is refused here (see below)"
)
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
        return {
            "x0": torch.cat([flow, occlusion]),
            "z0": torch.randn(COND, SIDE, SIDE, generator=g),
            "text": torch.randn(TEXT, generator=g),
        }


def train_and_sample(tmp_path: Path, device: torch.device, precision: str) -> None:
    unet = Unet3D(
        UNetConfig(dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8),
        cond_channels=COND,
        text_dim=TEXT,
        latent_size=SIDE,
    )
    diffusion = FlowDiffusion(unet, DiffusionConfig(timesteps=50))
    data = RandomFlows()
    diffusion.fit_target(torch.stack([data[i]["x0"] for i in range(len(data))]))
    diffusion.to(device).train()
    optimizer = adam(diffusion.parameters(), 1e-3, (0.9, 0.99))
    state = TrainingState(
        tmp_path / "state.pt", diffusion, optimizer, lr_schedule(optimizer, "linear", 3, (), 1.0), {}
    )
    loader = sharded_loader(data, 4, "batch_size", seed=0, num_workers=0, generator=torch.Generator())

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        return {"diffusion": diffusion(batch["x0"], batch["z0"], batch["text"])}

    fit(
        "cuda",
        state,
        loader,
        loss,
        SimpleNamespace(steps=3, log_every=1, checkpoint_every=2),
        objective="diffusion",
        device=device,
        precision=precision,
        grad_clip=1.0,
    )
    assert state.step == 3 and all(p.device.type == device.type for p in diffusion.parameters())
    assert all(torch.isfinite(p).all() for p in diffusion.parameters())

    diffusion.eval()
    batch = next(iter(loader))
    outputs = []
    hook = unet.final_conv.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    with autocast(device, precision):
        flows = diffusion.sample(
            batch["z0"].to(device),
            batch["text"].to(device),
            num_frames=K,
            sampler=SamplerConfig(sampler="ddim", steps=2),
            generator=torch.Generator(device).manual_seed(0),
        )
    hook.remove()
    ran = torch.bfloat16 if resolve_precision(device, precision) == "bf16" else torch.float32
    assert outputs == [ran] * 2  # the U-Net ran in it
    assert flows.device.type == device.type and flows.shape == (4, 3, K, SIDE, SIDE)
    assert torch.isfinite(flows).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_and_sampling_run_on_cuda(tmp_path: Path, precision: str) -> None:
    train_and_sample(tmp_path, torch.device("cuda"), precision)


@needs_native_bf16
def test_bf16_training_and_sampling_run_on_a_cpu_that_has_it(tmp_path: Path) -> None:
    train_and_sample(tmp_path, torch.device("cpu"), "bf16")


def test_bf16_is_refused_on_a_cpu_that_would_emulate_it(monkeypatch) -> None:
    monkeypatch.setattr(lfdm_device, "cpu_has_native_bf16", lambda: False)
    refused = "^precision: bf16 on this CPU .* no AMX or AVX512-BF16.*set precision to fp32"
    with pytest.raises(ParamsError, match=refused), autocast(torch.device("cpu"), "bf16"):
        pass
    with autocast(torch.device("cpu"), "fp32"):  # fp32 runs anywhere
        pass


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it(
    tmp_path: Path, monkeypatch, native: bool
) -> None:
    monkeypatch.setattr(lfdm_device, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision(torch.device("cpu"), "auto") == ("bf16" if native else "fp32")
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"  # explicit choices stay
    if native == cpu_has_native_bf16():  # this CPU can run what auto picks: train and sample under it
        train_and_sample(tmp_path, torch.device("cpu"), "auto")


def test_the_warp_grid_stays_fp32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    grid = identity_grid(64, 64).expand(2, 64, 64, 2) + 0.01 * torch.randn(2, 64, 64, 2, generator=g)
    exact = warp(x, grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(warp(x, grid), exact)
        coarse = warp(x, grid.bfloat16().float())  # what a bf16 grid would sample
    assert (coarse - exact).abs().max() > 1e-3
