"""Device and precision in one place: nothing else in lfdm picks a device or calls ``.cuda()``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU. An explicit CUDA device that does not exist is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for CUDA, but torch sees no CUDA device (use 'auto' or 'cpu')")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """bf16 autocast on CUDA when asked; a no-op otherwise (bf16 on CPU is slower than fp32 here)."""
    if precision == "bf16" and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
