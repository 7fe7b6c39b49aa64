"""Save/load the two trained models: weights + the config section that built them + step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lfdm.checkpoint import load_checkpoint, save_checkpoint
from lfdm.config import DMConfig, LFAEConfig, Params
from lfdm.diffusion import FlowDiffusion
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.unet3d import Unet3D


def save_lfae(path: str | Path, model: LatentFlowAutoEncoder, cfg: LFAEConfig, *, image_size: int, step: int) -> None:
    save_checkpoint(path, model=model.state_dict(), config=cfg.model_dump(mode="json"), image_size=image_size, step=step)


def load_lfae(path: str | Path, device: torch.device) -> tuple[LatentFlowAutoEncoder, dict[str, Any]]:
    """The LFAE in eval mode on ``device``, and the checkpoint's metadata (config, image_size, step)."""
    ckpt = load_checkpoint(path)
    model = LatentFlowAutoEncoder(LFAEConfig.model_validate(ckpt["config"]))
    model.load_state_dict(ckpt.pop("model"))
    return model.to(device).eval(), ckpt


def finetuned_lfae_path(p: Params) -> Path:
    """Where ``finetune_decoder`` writes the LFAE with its new-domain decoder."""
    return Path(p.paths.finetune) / "lfae.pt"


def sampling_lfae_path(p: Params) -> Path:
    """The LFAE that ``sample`` and ``lfdm generate`` decode with (``sample.decoder``)."""
    return finetuned_lfae_path(p) if p.sample.decoder == "finetuned" else Path(p.paths.lfae)


def init_lfae(model: LatentFlowAutoEncoder, path: str | Path, image_size: int) -> int:
    """Load the weights of the LFAE checkpoint ``path`` into ``model`` (warm start); returns its step.

    The checkpoint must have been built with the same ``lfae`` config and frame size: the error names
    every key that differs."""
    ckpt = load_checkpoint(path)
    theirs, ours = ckpt.get("config", {}), model.cfg.model_dump(mode="json")
    differ = {key: (theirs.get(key), value) for key, value in ours.items() if theirs.get(key) != value}
    if ckpt.get("image_size") != image_size:
        differ["data.image_size"] = (ckpt.get("image_size"), image_size)
    if differ:
        listed = ", ".join(f"{k} (checkpoint {a!r}, params {b!r})" for k, (a, b) in differ.items())
        raise ValueError(f"train_lfae.init {path} was built with other settings: {listed}")
    model.load_state_dict(ckpt["model"])
    return int(ckpt.get("step", 0))


def save_dm(
    path: str | Path, diffusion: FlowDiffusion, cfg: DMConfig, *, cond_channels: int, text_dim: int,
    num_frames: int, latent_size: int, step: int,
) -> None:
    save_checkpoint(
        path, model=diffusion.state_dict(), config=cfg.model_dump(mode="json"), cond_channels=cond_channels,
        text_dim=text_dim, num_frames=num_frames, latent_size=latent_size, step=step,
    )


def load_dm(path: str | Path, device: torch.device) -> tuple[FlowDiffusion, dict[str, Any]]:
    """The diffusion model (3D U-Net inside) in eval mode on ``device``, and the checkpoint's metadata."""
    ckpt = load_checkpoint(path)
    # models saved before the key existed were fitted to the unit range
    ckpt["config"]["diffusion"].setdefault("displacement_range", 1.0)
    cfg = DMConfig.model_validate(ckpt["config"])
    denoiser = Unet3D(
        cfg.unet, cond_channels=ckpt["cond_channels"], text_dim=ckpt["text_dim"], latent_size=ckpt["latent_size"]
    )
    diffusion = FlowDiffusion(denoiser, cfg.diffusion)
    diffusion.load_state_dict(ckpt.pop("model"))
    return diffusion.to(device).eval(), ckpt
