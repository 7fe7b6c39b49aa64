"""Device and precision in one place: nothing else in lfdm picks a device or calls ``.cuda()``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lfdm.config import DEVICES, ParamsError


def resolve_device(name: str = "auto", key: str = "device") -> torch.device:
    """``auto`` → CUDA when present, else CPU. A device torch cannot use here is an error naming ``key``
    (the params key or command-line flag it came from)."""
    if not DEVICES.fullmatch(name):
        raise ParamsError(f"{key}: unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError(
                f"{key}: {name!r} asks for CUDA, but torch {torch.__version__} sees no CUDA device here; "
                f"set {key} to auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParamsError(
                f"{key}: {name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})"
            )
    return device


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """bf16 autocast on CUDA when asked; a no-op otherwise (bf16 on CPU is slower than fp32 here)."""
    if precision == "bf16" and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
