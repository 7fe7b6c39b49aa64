"""U-Net cost per denoising step and per generated video, at the paper's shape and at the default shape.

    python benchmarks/unet.py                 # both shapes, batch 1 and 10 (paper) / 8 (default)
    python benchmarks/unet.py --shapes default --steps 3

Prints, per shape and batch: parameters, forward seconds per step (median of timed steps after a
warm-up), GFLOP per forward (counted by torch's FLOP counter), achieved GFLOP/s, seconds per video for
DDPM-1000 and DDIM-10 (steps × forward time / batch: the sampler's own arithmetic is negligible), and
peak memory (CUDA: max allocated per row; CPU: the process's peak RSS so far, so rows run smallest
first). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lfdm.config import Params, UNetConfig
from lfdm.device import resolve_device
from lfdm.models.unet3d import Unet3D

TEXT_DIM = 384  # the default BERT (all-MiniLM-L6-v2); the paper's bert-base is 768


def shapes(defaults: Params) -> dict[str, dict]:
    return {
        # paper Sec. 4.2: 40 × 32 × 32 × 3 latent flow, z0 with 256 channels, dim 64, mults (1, 2, 4, 8)
        "paper": dict(unet=UNetConfig(dim=64, dim_mults=(1, 2, 4, 8), attn_heads=8, spatial_attn_max_size=32),
                      frames=40, size=32, cond=256, batches=(1, 10)),
        "default": dict(unet=defaults.dm.unet, frames=defaults.data.num_frames, size=defaults.data.image_size // 4,
                        cond=defaults.lfae.latent_channels, batches=(1, defaults.sample.batch_size)),
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (Linux)


def bench(unet: UNetConfig, frames: int, size: int, cond: int, batch: int, steps: int, device, dtype) -> dict:
    model = Unet3D(unet, cond_channels=cond, text_dim=TEXT_DIM, latent_size=size).to(device).eval()
    x = torch.randn(batch, 3, frames, size, size, device=device)
    z0 = torch.randn(batch, cond, size, size, device=device)
    text = torch.randn(batch, TEXT_DIM, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        with FlopCounterMode(display=False) as counter:
            model(x, t, z0, text)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x, t, z0, text)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    gflop = counter.get_total_flops() / 1e9
    return dict(params_m=model.num_parameters / 1e6, step_s=step, gflop=gflop, gflops=gflop / step,
                ddpm1000_s=1000 * step / batch, ddim10_s=10 * step / batch, peak_gb=peak_memory_gb(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # smaller shape first: on CPU the peak is the process's max RSS so far
    parser.add_argument("--shapes", nargs="+", default=["default", "paper"], choices=["paper", "default"])
    parser.add_argument("--steps", type=int, default=3, help="timed forward passes per row (after one warm-up)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"machine: {machine(device)}; dtype {str(dtype).removeprefix('torch.')}")
    print("| shape | batch | params (M) | fwd s/step | GFLOP/fwd | GFLOP/s | DDPM-1000 s/video | DDIM-10 s/video | peak mem (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        spec = shapes(Params())[name]
        for batch in spec["batches"]:
            r = bench(spec["unet"], spec["frames"], spec["size"], spec["cond"], batch, args.steps, device, dtype)
            print(f"| {name} ({spec['frames']}×{spec['size']}²×3, z0 {spec['cond']}) | {batch} | {r['params_m']:.1f} "
                  f"| {r['step_s']:.3f} | {r['gflop']:.0f} | {r['gflops']:.0f} | {r['ddpm1000_s']:.1f} "
                  f"| {r['ddim10_s']:.2f} | {r['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
