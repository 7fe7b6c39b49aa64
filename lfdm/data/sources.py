"""``data.dataset`` → an iterator of clips (``lfdm.data.embedded.Clip``) for ``preprocess``.

The embedded dataset is rendered; the real ones (``folder``, ``mug``, ``mhad``, ``natops``,
``faceforensics``) are listed by their readers (``lfdm.data.folder``, ``lfdm.data.readers``) and loaded
clip by clip (``lfdm.data.clips``). Problems with the dataset as a whole (``data.root`` missing, a bad
``labels.csv``, no clips found) raise a :class:`~lfdm.data.clips.DatasetError` at once, before any video is
read; a clip that cannot be used (missing, corrupt, too short, no face, a FIFO or device) is skipped with a :class:`SkippedClipWarning` and handed to
``on_skip``, and the others go on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from lfdm.config import DataConfig
from lfdm.data.clips import DatasetError, Skip, Source, load_source
from lfdm.data.embedded import Clip, generate_clips
from lfdm.data.folder import folder_sources
from lfdm.data.readers import faceforensics_sources, mhad_sources, mug_sources, natops_sources

READERS: dict[str, Callable[[Path, DataConfig, int], list[Source]]] = {
    "folder": folder_sources,
    "mug": mug_sources,
    "mhad": mhad_sources,
    "natops": natops_sources,
    "faceforensics": faceforensics_sources,
}


class SkippedClipWarning(UserWarning):
    """A clip that preprocess could not use; it is left out and recorded."""


def iter_dataset(cfg: DataConfig, seed: int, on_skip: Callable[[Skip], None] | None = None) -> Iterator[Clip]:
    """The clips of ``cfg.dataset`` at ``cfg.image_size``. Real datasets are listed (and validated)
    now and read lazily, one clip at a time."""
    if cfg.dataset == "embedded":
        return generate_clips(cfg, seed)
    root = Path(cfg.root or "").expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root={cfg.root!r}: no such directory (the {cfg.dataset} dataset)")
    return _load(READERS[cfg.dataset](root, cfg, seed), cfg, on_skip)


def _load(sources: list[Source], cfg: DataConfig, on_skip: Callable[[Skip], None] | None) -> Iterator[Clip]:
    for source in sources:
        for item in load_source(source, cfg):
            if isinstance(item, Skip):
                warnings.warn(
                    f"skipped clip {item.video_id}: {item.reason}", SkippedClipWarning, stacklevel=1
                )
                if on_skip is not None:
                    on_skip(item)
            else:
                yield item
