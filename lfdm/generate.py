"""Inference (paper Fig. 2): encode x0 → sample latent flow + occlusion with the DM, conditioned on z0 and
the label embedding → warp z0 (always from x0) → decode every frame."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lfdm.config import SamplerConfig, TextConfig
from lfdm.diffusion import FlowDiffusion, load_dm
from lfdm.models.checkpoints import load_lfae
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.warp import from_diffusion_tensor
from lfdm.text import BertEmbedder, load_embeddings


@dataclass
class Generation:
    videos: torch.Tensor  # (B, K, 3, H, W) in [0, 1]; frame 0 is the decoded x0 (identity flow)
    flow: torch.Tensor  # (B, K, h, w, 2) absolute sampling grids
    occlusion: torch.Tensor  # (B, K, 1, h, w) in [0, 1]
    z0: torch.Tensor  # (B, C, h, w) the given images' latents


class LFDMPipeline:
    """The trained LFAE + DM + label embeddings. Labels missing from the embedding table (free-text
    prompts) are embedded on the fly with the same BERT checkpoint that made the table."""

    def __init__(
        self,
        lfae: LatentFlowAutoEncoder,
        diffusion: FlowDiffusion,
        *,
        num_frames: int,
        image_size: int,
        embeddings: dict[str, torch.Tensor],
        text: TextConfig,
    ) -> None:
        self.lfae, self.diffusion = lfae.eval(), diffusion.eval()
        self.num_frames, self.image_size = num_frames, image_size
        self.embeddings, self.text = embeddings, text
        self._bert: BertEmbedder | None = None

    @classmethod
    def from_checkpoints(
        cls, lfae_path: str | Path, dm_path: str | Path, embeddings_path: str | Path | None,
        text: TextConfig, device: torch.device,
    ) -> LFDMPipeline:
        lfae, lfae_meta = load_lfae(lfae_path, device)
        diffusion, dm_meta = load_dm(dm_path, device)
        embeddings = load_embeddings(embeddings_path) if embeddings_path and Path(embeddings_path).exists() else {}
        return cls(
            lfae, diffusion, num_frames=dm_meta["num_frames"], image_size=lfae_meta["image_size"],
            embeddings=embeddings, text=text,
        )

    @property
    def latent_channels(self) -> int:
        return self.lfae.cfg.latent_channels

    @property
    def device(self) -> torch.device:
        return next(self.diffusion.parameters()).device

    def embed(self, labels: list[str]) -> torch.Tensor:
        missing = [label for label in labels if label not in self.embeddings]
        if missing:
            self._bert = self._bert or BertEmbedder(self.text, device=self.device)
            self.embeddings |= dict(zip(missing, self._bert.embed(missing).cpu(), strict=True))
        return torch.stack([self.embeddings[label] for label in labels]).to(self.device)

    @torch.inference_mode()
    def __call__(
        self, images: torch.Tensor, labels: list[str], sampler: SamplerConfig, generator: torch.Generator | None = None,
    ) -> Generation:
        """``images (B, 3, H, W)`` in [0, 1] at the trained size, one label per image."""
        if images.shape[0] != len(labels):
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        images = images.to(self.device)
        features = self.lfae.encode(images)
        x = self.diffusion.sample(
            features.latent, self.embed(labels), num_frames=self.num_frames, sampler=sampler, generator=generator
        )
        grid, occlusion = from_diffusion_tensor(x)
        k = self.num_frames  # every frame warps its own clip's x0 (never the previous frame)
        frames = self.lfae.decode(
            features.repeat_interleave(k), images.repeat_interleave(k, 0), grid.flatten(0, 1), occlusion.flatten(0, 1)
        )
        return Generation(
            videos=frames.unflatten(0, (len(labels), k)), flow=grid, occlusion=occlusion, z0=features.latent
        )


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file → ``(3, size, size)`` in [0, 1]: centre square crop, then resize (any mode → RGB)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
