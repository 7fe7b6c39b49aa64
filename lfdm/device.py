"""Device and precision in one place: nothing else in lfdm picks a device or calls ``.cuda()``."""

from __future__ import annotations

import contextlib
import functools
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


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: this CPU multiplies bf16 natively (2–4× its fp32 rate); elsewhere torch emulates
    bf16, slower than fp32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def check_precision(device: torch.device, precision: str, key: str = "precision") -> None:
    """Refuse bf16 on a CPU that would emulate it, naming ``key``."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise ParamsError(
            f"{key}: bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AMX or AVX512-BF16) would "
            f"be emulated, slower than fp32; set {key} to fp32"
        )


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` → bf16 where ``device`` computes it natively (a CUDA GPU with bf16, a CPU with AMX or
    AVX512-BF16), else fp32; fp32 and bf16 as they are."""
    if precision != "auto":
        return precision
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    return "bf16" if native else "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """bf16 autocast when asked (or ``auto`` picks it, :func:`resolve_precision`), on CUDA or a CPU with
    native bf16 (:func:`check_precision`); a no-op for fp32. Region geometry, warps and Fréchet distances
    stay fp32 inside it (they turn autocast off)."""
    if resolve_precision(device, precision) != "bf16":
        yield
        return
    check_precision(device, "bf16")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield
