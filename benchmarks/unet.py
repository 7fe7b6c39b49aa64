"""U-Net cost per denoising step, per training step and per generated video, ours beside the reference
design (``benchmarks/reference_unet.py``: linear spatial attention, einsum temporal attention, 5-D Conv3d,
guidance as two passes), at the paper's shape and at the default shape.

    python benchmarks/unet.py                                  # both designs, both shapes
    python benchmarks/unet.py --shapes default --steps 3 --designs ours
    python benchmarks/unet.py --precisions fp32 bf16           # fp32 beside bf16 autocast (CUDA, or AMX / AVX512-BF16)
    python benchmarks/unet.py --device cuda --precisions fp32 bf16   # on a GPU
    python benchmarks/unet.py --shapes paper --batches 10 --no-train   # batch 10 without ~27 GB of activations
    python benchmarks/unet.py --operators --shapes paper --batches 1   # where the forward's time goes, per operator

Each row runs in its own process, so its peak memory is its own (CUDA: max allocated; CPU: the process's
peak RSS, which includes ≈ 0.4 GB of torch itself). Per row: parameters, forward seconds (median of the
timed steps after a warm-up), GFLOP per forward (torch's FLOP counter), achieved GFLOP/s, a training
step (forward + backward), a guided sampling step (g ≠ 1: ours one batched pass over 2B rows, the
reference two passes), and seconds per video for DDPM-1000 and DDIM-10 at g = 1 (the paper's: one
pass per step). The header gives the dense matmul rate the GFLOP/s compare with. ``--operators`` profiles
the forward of the first design, shape, batch and precision instead: per operator kind, its share of the
time, its FLOPs (torch's counter) and the rate it runs at. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lfdm.config import Params, UNetConfig
from lfdm.device import check_precision, resolve_device
from lfdm.models.unet3d import Unet3D

sys.path.insert(0, str(Path(__file__).parent))
from reference_unet import ReferenceUnet3D  # a benchmark-only module beside this script


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FLOP counter has no formula for SDPA's CPU flash kernel (it counted attention as 0): the generic one
SDPA_CPU_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
TEXT_DIM = 384  # the default BERT (all-MiniLM-L6-v2); the paper's bert-base is 768
DESIGNS = {"ours": Unet3D, "reference": ReferenceUnet3D}


def shapes(defaults: Params) -> dict[str, dict]:
    return {
        # paper Sec. 4.2: 40 × 32 × 32 × 3 latent flow, z0 with 256 channels, dim 64, mults (1, 2, 4, 8)
        "paper": {
            "unet": UNetConfig(dim=64, dim_mults=(1, 2, 4, 8), attn_heads=8, spatial_attn_max_size=32),
            "frames": 40,
            "size": 32,
            "cond": 256,
            "batches": (1, 10),
        },
        "default": {
            "unet": defaults.dm.unet,
            "frames": defaults.data.num_frames,
            "size": defaults.data.image_size // 4,
            "cond": defaults.lfae.latent_channels,
            "batches": (1, defaults.sample.batch_size),
        },
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (Linux)


def timed(fn, steps: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after one warm-up."""
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_and_inputs(
    design: str, shape: str, batch: int, device: torch.device
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The design's U-Net at ``shape`` and random inputs for it: noisy flows, timesteps, z0, text."""
    spec = shapes(Params())[shape]
    frames, size, cond = spec["frames"], spec["size"], spec["cond"]
    model = DESIGNS[design](spec["unet"], cond_channels=cond, text_dim=TEXT_DIM, latent_size=size).to(device)
    inputs = (
        torch.randn(batch, 3, frames, size, size, device=device),
        torch.randint(0, 1000, (batch,), device=device),
        torch.randn(batch, cond, size, size, device=device),
        torch.randn(batch, TEXT_DIM, device=device),
    )
    return model, inputs


def bench(
    design: str,
    shape: str,
    batch: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    train: bool = True,
) -> dict:
    model, (x, t, z0, text) = model_and_inputs(design, shape, batch, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def guided() -> None:  # one sampling step with g != 1: conditional and null predictions
        if design == "ours":  # one batched pass, as lfdm.diffusion does
            model(
                x.repeat(2, 1, 1, 1, 1),
                t.repeat(2),
                z0.repeat(2, 1, 1, 1),
                text.repeat(2, 1),
                drop_text=torch.arange(2 * batch, device=device) >= batch,
            )
        else:  # the reference: two passes
            model(x, t, z0, text)
            model(x, t, z0, torch.zeros_like(text))

    def train_step() -> None:
        with autocast:
            loss = model(x, t, z0, text).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    with torch.inference_mode(), autocast:
        with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
            model(x, t, z0, text)
        forward = timed(lambda: model(x, t, z0, text), steps, device)
        guided_s = timed(guided, steps, device)
    model.train()
    train_s = timed(train_step, steps, device) if train else float("nan")
    gflop = counter.get_total_flops() / 1e9
    return {
        "params_m": model.num_parameters / 1e6,
        "forward_s": forward,
        "gflop": gflop,
        "gflops": gflop / forward,
        "train_s": train_s,
        "guided_s": guided_s,
        "ddpm1000_s": 1000 * forward / batch,
        "ddim10_s": 10 * forward / batch,
        "peak_gb": peak_memory_gb(device),
    }


# FLOP-counted operators by kind: the profiler's kernel names (self time) and the FLOP counter's op names
OPERATOR_KINDS = {
    "convolution": (("conv",), ("convolution",)),
    "linear (mm, addmm)": (("aten::mm", "aten::addmm"), ("mm", "addmm")),
    "batched matmul (bmm)": (("aten::bmm", "aten::baddbmm"), ("bmm", "baddbmm")),
    "attention (SDPA kernel)": (("scaled_dot_product",), ("scaled_dot_product",)),
}


def operator_kind(name: str, table: int) -> str | None:
    for kind, names in OPERATOR_KINDS.items():
        if any(n == name or (not n.startswith("aten::") and n in name) for n in names[table]):
            return kind
    return None


def operator_profile(
    design: str, shape: str, batch: int, steps: int, device: torch.device, dtype: torch.dtype, rate: float
) -> None:
    """Per operator kind of one forward: milliseconds (self time, median over ``steps`` profiled
    forwards' mean), share of the forward, GFLOP and GFLOP/s against the dense matmul ``rate``; the
    operators without FLOPs (normalisation, activations, copies) by name after them."""
    model, args = model_and_inputs(design, shape, batch, device)
    model.eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
            model(*args)
        model(*args)  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                model(*args)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    flops: dict[str, float] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        kind = operator_kind(str(op).removeprefix("aten."), 1) or "other"
        flops[kind] = flops.get(kind, 0.0) + n
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for event in prof.key_averages():
        kind = operator_kind(event.key, 0) or event.key
        seconds[kind] = seconds.get(kind, 0.0) + getattr(event, attr) / 1e6 / steps
        calls[kind] = calls.get(kind, 0) + event.count // steps
    total = sum(seconds.values())
    print(
        f"forward of {design} at the {shape} shape, batch {batch}, {dtype}: {total:.3f} s "
        f"(profiled, mean of {steps}), {sum(flops.values()) / 1e9:.1f} GFLOP; dense matmul {rate:.0f} GFLOP/s"
    )
    print("| operator | calls | ms | share of forward | GFLOP | GFLOP/s | of the matmul rate |")
    print("|---|---|---|---|---|---|---|")
    rest = sorted((k for k in seconds if k not in OPERATOR_KINDS), key=seconds.__getitem__, reverse=True)
    for kind in [*OPERATOR_KINDS, *rest[:8]]:
        s, f = seconds.get(kind, 0.0), flops.get(kind, 0.0) / 1e9
        rate_cells = f"{f:.1f} | {f / s:.0f} | {f / s / rate:.0%}" if f and s else "– | – | –"
        print(f"| {kind} | {calls.get(kind, 0)} | {1e3 * s:.1f} | {s / total:.1%} | {rate_cells} |")
    other = sum(seconds[k] for k in rest[8:])
    print(
        f"| everything else ({len(rest) - 8} operators) | | {1e3 * other:.1f} | {other / total:.1%} | – | – | – |"
    )


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """The machine's dense matmul rate: the ceiling the U-Net's GFLOP/s is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, 5, device) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["default", "paper"], choices=["paper", "default"])
    parser.add_argument("--designs", nargs="+", default=["ours", "reference"], choices=list(DESIGNS))
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: each shape's own)")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per figure (after one warm-up)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="fp32 and/or bf16 autocast (CUDA, or a CPU with AMX or AVX512-BF16); a row each",
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="skip the training step (paper shape, batch 10: ≈ 27 GB of activations in fp32)",
    )
    parser.add_argument(
        "--operators", action="store_true", help="profile one forward per operator kind (first of each list)"
    )
    parser.add_argument("--row", nargs=3, metavar=("DESIGN", "SHAPE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for precision in args.precisions:
        check_precision(device, precision, key="--precisions")
    if args.row:  # one row, in its own process
        design, shape, batch = args.row
        dtype = dtypes[args.precisions[0]]
        print(
            json.dumps(bench(design, shape, int(batch), args.steps, device, dtype, train=not args.no_train))
        )
        return

    if args.operators:
        shape, precision = args.shapes[0], args.precisions[0]
        batch = (args.batches or shapes(Params())[shape]["batches"])[0]
        rate = matmul_gflops(device, dtypes[precision])
        operator_profile(args.designs[0], shape, batch, args.steps, device, dtypes[precision], rate)
        return

    rates = ", ".join(f"{p} {matmul_gflops(device, dtypes[p]):.0f}" for p in args.precisions)
    print(f"machine: {machine(device)}; dense matmul (2048³) GFLOP/s: {rates}")
    print(
        "| shape | batch | design | precision | params (M) | fwd s | GFLOP/fwd | GFLOP/s | train step s "
        "| guided step s | DDPM-1000 s/video | DDIM-10 s/video | peak mem (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        spec = shapes(Params())[shape]
        for batch in args.batches or spec["batches"]:
            for design in args.designs:
                for precision in args.precisions:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--row",
                        design,
                        shape,
                        str(batch),
                        "--steps",
                        str(args.steps),
                        "--device",
                        args.device,
                        "--precisions",
                        precision,
                        *(["--no-train"] if args.no_train else []),
                    ]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    r = json.loads(out.splitlines()[-1])
                    train = "not run" if math.isnan(r["train_s"]) else f"{r['train_s']:.3f}"
                    print(
                        f"| {shape} ({spec['frames']}×{spec['size']}²×3, z0 {spec['cond']}) | {batch} | {design} "
                        f"| {precision} | {r['params_m']:.1f} | {r['forward_s']:.3f} | {r['gflop']:.0f} "
                        f"| {r['gflops']:.0f} | {train} | {r['guided_s']:.3f} | {r['ddpm1000_s']:.1f} "
                        f"| {r['ddim10_s']:.2f} | {r['peak_gb']:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
