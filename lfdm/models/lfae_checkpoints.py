"""Save/load stage one: weights + the config section that built them + step + which clips it was trained on.
(The diffusion model's are ``lfdm.diffusion.save_dm`` / ``load_dm``.)"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from lfdm.checkpoint import load_checkpoint, save_checkpoint
from lfdm.config import DataConfig, LFAEConfig, Params
from lfdm.data.manifest import ManifestRow
from lfdm.models.lfae import LatentFlowAutoEncoder


class WarmStartWarning(UserWarning):
    """A stage-one warm start that was trained on other footage than the params name."""


def trained_on(data: DataConfig, seed: int, rows: Sequence[ManifestRow]) -> dict[str, Any]:
    """What a stage-one checkpoint records of its training data: the dataset, and the clips it saw."""
    return {"dataset": data.dataset, "root": data.root, "seed": seed, "video_ids": [r.video_id for r in rows]}


def save_lfae(
    path: str | Path,
    model: LatentFlowAutoEncoder,
    cfg: LFAEConfig,
    *,
    image_size: int,
    step: int,
    data: dict[str, Any] | None = None,
) -> None:
    """The whole LFAE; ``data``: :func:`trained_on`."""
    save_checkpoint(
        path,
        model=model.state_dict(),
        config=cfg.model_dump(mode="json"),
        image_size=image_size,
        step=step,
        trained_on=data,
    )


def save_flow_predictor(
    path: str | Path, model: LatentFlowAutoEncoder, *, image_size: int, step: int, data: dict[str, Any]
) -> None:
    """F alone (``pretrain_flow``); :func:`init_lfae` loads it into an LFAE built from the same config."""
    save_checkpoint(
        path,
        flow_predictor=model.flow_predictor.state_dict(),
        config=model.cfg.model_dump(mode="json"),
        image_size=image_size,
        step=step,
        trained_on=data,
    )


# what LFAE checkpoints saved before a key existed were built with
_LFAE_KEYS_ADDED = {"motion_estimator": "mraa", "padding": "zeros"}


def _load_lfae_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    ckpt["config"] = _LFAE_KEYS_ADDED | ckpt.get("config", {})
    return ckpt


def load_lfae(path: str | Path, device: torch.device) -> tuple[LatentFlowAutoEncoder, dict[str, Any]]:
    """The LFAE in eval mode on ``device``, and the checkpoint's metadata (config, image_size, step)."""
    ckpt = _load_lfae_checkpoint(path)
    model = LatentFlowAutoEncoder(LFAEConfig.model_validate(ckpt["config"]))
    model.load_state_dict(ckpt.pop("model"))
    return model.to(device).eval(), ckpt


def finetuned_lfae_path(p: Params) -> Path:
    """Where ``finetune_decoder`` writes the LFAE with its new-domain decoder."""
    return Path(p.paths.finetune) / "lfae.pt"


def sampling_lfae_path(p: Params) -> Path:
    """The LFAE that ``sample`` and ``lfdm generate`` decode with (``sample.decoder``)."""
    return finetuned_lfae_path(p) if p.sample.decoder == "finetuned" else Path(p.paths.lfae)


def init_lfae(
    model: LatentFlowAutoEncoder,
    path: str | Path,
    image_size: int,
    data: DataConfig,
    test_ids: Collection[str],
) -> int:
    """Load the LFAE or flow-predictor checkpoint ``path`` into ``model`` (a warm start); returns its step.

    The checkpoint must have been built with the same ``lfae`` config (F's keys, for a flow-predictor
    checkpoint) and frame size (the error names every key that differs), and must not have been trained on any of ``test_ids``, this dataset's test clips;
    one trained on another dataset than ``data`` names gets a warning naming both."""
    ckpt = _load_lfae_checkpoint(path)
    theirs, ours = ckpt.get("config", {}), model.cfg.model_dump(mode="json")
    if "flow_predictor" in ckpt:
        ours = {key: value for key, value in ours.items() if key in model.cfg.flow_predictor_keys}
    differ = {key: (theirs.get(key), value) for key, value in ours.items() if theirs.get(key) != value}
    if ckpt.get("image_size") != image_size:
        differ["data.image_size"] = (ckpt.get("image_size"), image_size)
    if differ:
        listed = ", ".join(f"{k} (checkpoint {a!r}, params {b!r})" for k, (a, b) in differ.items())
        raise ValueError(f"train_lfae.init {path} was built with other settings: {listed}")
    if (origin := ckpt.get("trained_on")) is None:
        warnings.warn(
            f"train_lfae.init {path} does not record what it was trained on: nothing checks that it "
            "never saw a test clip",
            WarmStartWarning,
            stacklevel=2,
        )
    else:
        if seen := sorted(set(origin["video_ids"]) & set(test_ids)):
            raise ValueError(
                f"train_lfae.init {path} was trained on {len(seen)} of this dataset's test clips ({', '.join(seen[:3])}"
                f"{', …' if len(seen) > 3 else ''}): it was made for another split (its seed {origin['seed']}). "
                "Use train_lfae.init: pretrain_flow (`dvc repro pretrain_flow` distils F from the training clips)"
            )
        if (origin["dataset"], origin["root"]) != (data.dataset, data.root):
            warnings.warn(
                f"train_lfae.init {path} was trained on data.dataset {origin['dataset']!r} (root {origin['root']!r}), "
                f"the params name {data.dataset!r} (root {data.root!r}): its motion may not be your footage's",
                WarmStartWarning,
                stacklevel=2,
            )
    if "flow_predictor" in ckpt:
        model.flow_predictor.load_state_dict(ckpt["flow_predictor"])
    else:
        model.load_state_dict(ckpt["model"])
    return int(ckpt.get("step", 0))
