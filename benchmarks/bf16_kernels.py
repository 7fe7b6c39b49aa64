"""The kernels that stay fp32 under bf16 autocast on the CPU, and why: forward + backward of each in bf16 and fp32.

    python benchmarks/bf16_kernels.py              # the default shapes, 2 threads
    python benchmarks/bf16_kernels.py --repeats 20

- attention: torch's fused SDPA at the default U-Net's spatial attention (40 frames × 2 heads × 32 channels a
  head; 8² and 4² tokens), as ``lfdm/models/unet3d.py`` calls it;
- perceptual trunk: the perceptual loss's network on a ``train_lfae`` batch (16 × 3 × 64²) up to its deepest
  tap: MobileNetV2 (depthwise convolutions) and VGG19 (dense ones), random weights (speed does not depend on
  them), in bf16 autocast, fp32, fp32 channels-last, and fp32 channels-last with the batch norms folded into the
  convolutions (what ``ImageNetFeatures`` runs for MobileNetV2; VGG19 has none).

Medians of interleaved repeats in one process (ms). A benchmark, not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from lfdm.device import cpu_has_native_bf16
from lfdm.losses import _TAPS, fold_batch_norms


def attention(tokens: int, bf16: bool) -> Callable[[], None]:
    dtype = torch.bfloat16 if bf16 else torch.float32
    q, k, v = (torch.randn(40, 2, tokens, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    return lambda: F.scaled_dot_product_attention(q, k, v).float().sum().backward()


def trunk(backbone: str, mode: str) -> Callable[[], None]:
    depth = _TAPS[backbone][-1] + 1  # as lfdm.losses.ImageNetFeatures keeps it
    net = getattr(torchvision.models, backbone)().features[:depth].eval().requires_grad_(False)
    if mode.endswith("folded"):
        fold_batch_norms(net)
    layout = torch.channels_last if "channels-last" in mode else torch.contiguous_format
    net = net.to(memory_format=layout)

    def step() -> None:
        x = torch.rand(16, 3, 64, 64).contiguous(memory_format=layout).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = net(x)
        out.float().abs().mean().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases: dict[tuple[str, str], Callable[[], None]] = {}
    for tokens in (64, 16):
        for bf16 in (True, False):
            cases[(f"attention, {tokens} tokens", "bf16" if bf16 else "fp32")] = attention(tokens, bf16)
    for backbone in ("mobilenet_v2", "vgg19"):
        for mode in ("bf16", "fp32", "fp32, channels-last", "fp32, channels-last, batch norms folded"):
            cases[(f"{backbone} trunk", mode)] = trunk(backbone, mode)
    times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for run in cases.values():
        run()  # warm-up: oneDNN builds its kernels on first use
    for _ in range(args.repeats):
        for case, run in cases.items():
            start = time.perf_counter()
            run()
            times[case].append(time.perf_counter() - start)
    print(
        f"CPU native bf16: {cpu_has_native_bf16()}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print("| kernel | precision | forward + backward ms |\n|---|---|---|")
    for (kernel, precision), seconds in times.items():
        print(f"| {kernel} | {precision} | {1000 * statistics.median(seconds):.1f} |")


if __name__ == "__main__":
    main()
