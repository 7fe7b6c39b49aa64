"""``data.dataset`` → an iterator of clips (``lfdm.data.embedded.Clip``) for ``preprocess``."""

from __future__ import annotations

from collections.abc import Iterator

from lfdm.config import DataConfig
from lfdm.data.embedded import Clip, generate_clips


def iter_dataset(cfg: DataConfig, seed: int) -> Iterator[Clip]:
    if cfg.dataset == "embedded":
        return generate_clips(cfg, seed)
    raise NotImplementedError(
        f"data.dataset={cfg.dataset!r} has no reader yet; use data.dataset=embedded "
        "(readers for mug, mhad, natops, faceforensics and folder are tracked in the real-datasets issue)"
    )
