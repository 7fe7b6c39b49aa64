"""The real params.yaml, shrunk: every stage runs in seconds on a CPU, same code paths. Unit tests take
their tiny models from it (:func:`tiny_params`), end-to-end tests write it into a temporary project."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lfdm.config import Params, parse_params

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "precision": "fp32",  # the same numbers on every host (auto would pick bf16 on some); test_precision covers bf16
    "data": {
        "image_size": 32,
        "num_frames": 4,
        "embedded": {"clips_per_image": 2, "test_images": 2, "max_train_images": 4, "source_frames": 6},
    },
    "lfae": {
        "base_channels": 8,
        "decoder_res_blocks": 1,
        "num_regions": 4,
        "region_block_expansion": 8,
        "region_num_blocks": 2,
        "region_max_features": 32,
        "flow_block_expansion": 8,
        "flow_num_blocks": 2,
        "flow_max_features": 32,
        "bg_block_expansion": 8,
        "bg_num_blocks": 2,
        "bg_max_features": 32,
        "corr_channels": 8,
        "corr_radius": 2,
    },
    "pretrain_flow": {
        "teacher": "dis_ultrafast",
        "teacher_scale": 1,
        "pairs_per_clip": 2,
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    # stage one from scratch, so train_lfae runs on its own; test_real_footage takes the distilled F (the default)
    "train_lfae": {
        "init": None,
        "freeze_motion": False,
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    "extract_flow": {"batch_size": 4},
    "dm": {
        "unet": {"dim": 8, "dim_mults": [1, 2], "resnet_groups": 4, "attn_heads": 2, "attn_dim_head": 8},
        "diffusion": {"timesteps": 50},
    },
    "train_dm": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
    "sample": {
        "steps": 2,
        "extra_labels": ["zoom in slowly"],
        "extra_label_videos": 1,
        "batch_size": 4,
        "seen_videos": 2,
    },
    "evaluate": {"max_grid_videos": 2, "classifier_steps": 5},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return out


def tiny_tree(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml with :data:`TINY` (and ``overrides``) merged in, as a plain tree."""
    return merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), overrides or {})


def tiny_params(overrides: dict[str, Any] | None = None) -> Params:
    """:func:`tiny_tree`, validated."""
    return parse_params(tiny_tree(overrides), "tiny params")
