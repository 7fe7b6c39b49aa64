"""The embedded default dataset: real photos animated by eight labelled camera motions.

Offline and deterministic: the photos ship inside scikit-image (``skimage.data``), and every clip is a
pure function of ``(seed, photo, crop, clip index)``. Each photo gives four *subject images*: square
windows on a 2×2 grid, each with side one third of the photo's short side, placed so that a window and
every camera path from it stay inside the photo (the renderer's reflection padding is only a safety
net, so frames never show black borders). A clip is a camera moving over the photo from its subject
window: every frame is an affine window of the photo sampled with ``affine_grid`` + ``grid_sample``,
so the motion is sub-pixel smooth.

Labels describe what the viewer sees, in the usual film sense:
- ``pan left/right/up/down``: the camera moves that way, so the picture slides the opposite way;
- ``zoom in/out``: the picture is magnified/shrunk about the frame centre;
- ``rotate clockwise/counterclockwise``: the picture turns that way on screen.

Per clip: speed 0.6–1.4× the base amplitude (pan 25 % of the frame side, zoom ×1.4, rotation 25°),
a start offset of up to ±5 % of the frame side, and a random ease-in-out.

Split by source photo: the test subjects come from photos never seen in training.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lfdm.config import DataConfig


@dataclass(frozen=True)
class Motion:
    """A camera path, at speed 1, reached at the end of the clip.

    ``pan``: camera displacement (x right, y down) in frame sides; ``zoom``: log magnification of the
    picture (> 0 zooms in); ``rotate``: degrees the picture turns, clockwise on screen when > 0.
    """

    pan: tuple[float, float] = (0.0, 0.0)
    zoom: float = 0.0
    rotate: float = 0.0


_PAN, _ZOOM, _ROTATE = 0.25, math.log(1.4), 25.0
MOTIONS: dict[str, Motion] = {
    "pan left": Motion(pan=(-_PAN, 0.0)),
    "pan right": Motion(pan=(_PAN, 0.0)),
    "pan up": Motion(pan=(0.0, -_PAN)),
    "pan down": Motion(pan=(0.0, _PAN)),
    "zoom in": Motion(zoom=_ZOOM),
    "zoom out": Motion(zoom=-_ZOOM),
    "rotate clockwise": Motion(rotate=_ROTATE),
    "rotate counterclockwise": Motion(rotate=-_ROTATE),
}
SPEED_RANGE = (0.6, 1.4)
MAX_START_OFFSET = 0.05  # of the frame side
CROPS_PER_PHOTO = 4  # 2×2 grid of subject windows

# skimage.data photos that load without a download and are textured nearly everywhere (flat sky, black
# borders or fog would make motion invisible and the test metrics meaningless): name → (top, bottom,
# left, right) box to use, or None for the whole photo. "motorcycle" is the left view of stereo_motorcycle.
PHOTOS: dict[str, tuple[int, int, int, int] | None] = {
    "brick": None,
    "camera": None,
    "chelsea": None,
    "coffee": None,
    "coins": None,
    "grass": None,
    "gravel": None,
    "immunohistochemistry": None,
    "moon": None,
    "motorcycle": None,
    "retina": (260, 1150, 260, 1150),  # inside the fundus disc; the corners are black
    "text": None,
}


@dataclass(frozen=True)
class Clip:
    """One rendered clip. ``frames``: ``(T, H, W, 3)`` uint8, ``T = cfg.embedded.source_frames``.

    ``camera`` (embedded clips only): ``(T, 2, 3)`` per frame, the affine map from frame coordinates
    (u, v) ∈ [-1, 1]² (pixel-centre convention of ``align_corners=False``) to the photo's; it gives the
    true motion between any two frames (:func:`true_flow`)."""

    video_id: str
    label: str
    subject: str
    split: str
    frames: np.ndarray
    source: str
    camera: np.ndarray | None = None


@dataclass(frozen=True)
class _Subject:
    photo: str
    crop: int

    @property
    def name(self) -> str:
        return f"{self.photo}-{self.crop}"


def generate_clips(cfg: DataConfig, seed: int) -> Iterator[Clip]:
    """All clips of the embedded dataset, train subjects first, at ``cfg.image_size``.

    Every subject gets ``cfg.embedded.clips_per_image`` clips; labels cycle through :data:`MOTIONS`
    with one running counter per split, so each split holds all classes equally often (±1).
    """
    train, test = _split_subjects(cfg, seed)
    labels, photos = list(MOTIONS), list(PHOTOS)
    for split, subjects in (("train", train), ("test", test)):
        counter = 0
        for subject in subjects:
            photo = _photo(subject.photo, cfg.image_size)
            for j in range(cfg.embedded.clips_per_image):
                label = labels[counter % len(labels)]
                counter += 1
                rng = np.random.default_rng([seed, photos.index(subject.photo), subject.crop, j])
                frames, camera = _render(
                    photo, subject.crop, MOTIONS[label], cfg.embedded.source_frames, cfg.image_size, rng
                )
                yield Clip(
                    video_id=f"{subject.name}-{j:02d}-{label.replace(' ', '-')}",
                    label=label,
                    subject=subject.name,
                    split=split,
                    frames=frames,
                    source=f"skimage:{subject.photo}#{subject.crop}",
                    camera=camera,
                )


def _split_subjects(cfg: DataConfig, seed: int) -> tuple[list[_Subject], list[_Subject]]:
    """(train, test) subjects. Whole photos are held out (shuffled by ``seed``) until they give
    ``test_images`` subjects; a held-out photo's surplus subjects are dropped, never trained on.
    Train subjects interleave photos (crop 0 of every photo, then crop 1, …) so that
    ``max_train_images`` keeps the photo variety."""
    emb = cfg.embedded
    order = [list(PHOTOS)[i] for i in np.random.default_rng(seed).permutation(len(PHOTOS))]
    held = -(-emb.test_images // CROPS_PER_PHOTO)
    if held >= len(order):
        raise ValueError(
            f"data.embedded.test_images={emb.test_images} needs {held} of the {len(order)} photos "
            f"({CROPS_PER_PHOTO} subjects each), leaving none for training"
        )
    test = [_Subject(p, c) for p in order[:held] for c in range(CROPS_PER_PHOTO)][: emb.test_images]
    train = [_Subject(p, c) for c in range(CROPS_PER_PHOTO) for p in order[held:]][: emb.max_train_images]
    return train, test


@functools.lru_cache(maxsize=32)
def _photo(name: str, image_size: int) -> torch.Tensor:
    """``(1, 3, h, w)`` float photo in [0, 1], its box cut out, resized (anti-aliased) so that a subject
    window spans 1.25·image_size px: the zoom-in end then needs almost no upsampling."""
    import skimage.data  # lazy: only the embedded dataset needs it

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if (box := PHOTOS[name]) is not None:
        img = img[box[0] : box[1], box[2] : box[3]]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float() / 255
    scale = 1.25 * image_size / (min(x.shape[-2:]) / 3)
    if scale < 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
    return x


def _window(photo: torch.Tensor, crop: int) -> tuple[float, float, float]:
    """Centre (x, y) and side of subject window ``crop`` in photo pixels (edges at 0 and w/h).

    Side = short side / 3; centres keep 0.9 sides from the photo edges, the farthest any camera path
    reaches (pan 0.35 + offset 0.05 + half window 0.5), and sit at the ends of that range."""
    h, w = photo.shape[-2:]
    side = min(h, w) / 3
    row, col = divmod(crop, 2)
    cx = 0.9 * side + col * (w - 1.8 * side)
    cy = 0.9 * side + row * (h - 1.8 * side)
    return cx, cy, side


def _render(
    photo: torch.Tensor, crop: int, motion: Motion, num_frames: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(T, size, size, 3)`` uint8 frames of ``motion`` starting from subject window ``crop``, and the
    ``(T, 2, 3)`` camera: frame (u, v, 1) → photo coordinates in [-1, 1] (``grid_sample``'s)."""
    h, w = photo.shape[-2:]
    cx, cy, side = _window(photo, crop)
    speed = rng.uniform(*SPEED_RANGE)
    cx, cy = (c + side * rng.uniform(-MAX_START_OFFSET, MAX_START_OFFSET) for c in (cx, cy))
    ease = rng.uniform(0.0, 0.6)  # blend of linear and smoothstep progress: still monotone
    t = np.linspace(0, 1, num_frames)[:, None, None]
    progress = speed * ((1 - ease) * t + ease * t * t * (3 - 2 * t))

    # frame pixel (u, v) ∈ [-1, 1]² shows photo pixel centre + A·(u, v)·side/2 with A = R(-angle)/magnification,
    # so the picture turns by +angle: clockwise on screen, y pointing down. The grid is built in numpy:
    # small torch ops cost more in thread hand-offs than in arithmetic.
    scale = np.exp(-motion.zoom * progress) * side / 2
    angle = np.deg2rad(motion.rotate * progress)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    u = ((np.arange(size) + 0.5) / size * 2 - 1)[None, None, :]  # pixel centres, align_corners=False
    v = u.transpose(0, 2, 1)
    x = cx + motion.pan[0] * side * progress + cos * u + sin * v
    y = cy + motion.pan[1] * side * progress - sin * u + cos * v
    grid = np.stack((x * 2 / w - 1, y * 2 / h - 1), axis=-1, dtype=np.float32)
    c, s, pos = cos[:, 0, 0], sin[:, 0, 0], progress[:, 0, 0]  # the same maps as (T, 2, 3) affines
    camera = np.stack(
        (
            np.stack((c, s, cx + motion.pan[0] * side * pos), axis=-1) * 2 / w - [0, 0, 1],
            np.stack((-s, c, cy + motion.pan[1] * side * pos), axis=-1) * 2 / h - [0, 0, 1],
        ),
        axis=1,
    )
    # one sampling call for the whole clip: frames stacked along the grid's height
    grid = torch.from_numpy(grid.reshape(1, num_frames * size, size, 2))
    frames = F.grid_sample(photo, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    frames = frames[0].numpy().reshape(3, num_frames, size, size).transpose(1, 2, 3, 0)
    return np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8), camera.astype(np.float32)


def true_flow(camera: np.ndarray, source: int, driving: int, latent_size: int, image_size: int) -> np.ndarray:
    """The exact backward flow grid ``(h, w, 2)`` from frame ``driving`` to frame ``source`` of a clip
    with ``camera`` (:class:`Clip`), in the convention of :mod:`lfdm.models.warp`: grid values are
    ``align_corners=True`` coordinates of the ``image_size`` frame (±1 at its corner pixels' centres, which
    lie at ±(W−1)/W in the camera's frame coordinates), sampled at the ``latent_size`` identity grid."""
    edge = (image_size - 1) / image_size
    z = np.linspace(-1, 1, latent_size)
    zx, zy = np.meshgrid(z, z)
    frame = np.stack((zx * edge, zy * edge, np.ones_like(zx)), axis=-1)  # driving frame (u, v, 1)
    photo = frame @ camera[driving].T.astype(np.float64)
    linear, offset = camera[source][:, :2].astype(np.float64), camera[source][:, 2].astype(np.float64)
    in_source = (photo - offset) @ np.linalg.inv(linear).T
    return (in_source / edge).astype(np.float32)
