"""Inference (paper Fig. 2) as one object in diffusers' shape: encode x0 → sample latent flow + occlusion with
the DM, conditioned on z0 and the label embedding → warp z0 (always from x0) → decode every frame.

:meth:`LFDMPipeline.save_pretrained` writes, and :meth:`~LFDMPipeline.from_pretrained` reads, one directory:

    lfdm_pipeline.json      sizes, the lfae / dm / text sections, the default sampler, the embedded labels
    lfae.safetensors        stage one: Φ, F, Ω
    dm.safetensors          stage two: the 3D U-Net and the displacement scale
    embeddings.safetensors  the label-embedding table, one row per label of the JSON's ``labels``
    text_encoder/           the BERT that embeds new prompts; absent when it is the offline all-MiniLM-L6-v2
                            package's (``text.checkpoint: null``)
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from lfdm.config import (
    DMConfig,
    LFAEConfig,
    Params,
    Precision,
    SamplerConfig,
    SamplerName,
    Section,
    TextConfig,
    TimestepSpacing,
    load_params,
)
from lfdm.device import autocast, resolve_device
from lfdm.diffusion import FlowDiffusion, load_dm
from lfdm.errors import MissingInput, UnreadableInput, UserError
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.unet3d import Unet3D
from lfdm.models.warp import from_diffusion_tensor
from lfdm.text import BertEmbedder, load_embeddings
from lfdm.video import write_video
from lfdm.viz import flow_strip, to_uint8

CONFIG_NAME = "lfdm_pipeline.json"
TEXT_ENCODER_DIR = "text_encoder"
FORMAT_VERSION = 1
ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
# __call__'s keyword for the SamplerConfig fields it names otherwise (diffusers' names)
KEYWORDS = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
MODEL_URI = re.compile(r"[a-z][a-z0-9+.-]+:/")  # models:/…, runs:/…, s3://…: an MLflow model, not a directory


class PipelineConfig(Section):
    """What rebuilds the networks around the saved weights (``lfdm_pipeline.json``)."""

    format_version: int = FORMAT_VERSION
    image_size: int
    num_frames: int
    text_dim: int  # the label embeddings' size, the U-Net's text input
    lfae: LFAEConfig
    dm: DMConfig
    text: TextConfig  # saved with checkpoint null (the packaged BERT) or "text_encoder" (a copy beside it)
    sampler: SamplerConfig = SamplerConfig()  # what a call without sampling arguments runs

    @classmethod
    def from_params(cls, p: Params, text_dim: int) -> PipelineConfig:
        """The networks the pipeline of params ``p`` builds, for label embeddings of ``text_dim``."""
        return cls(
            image_size=p.data.image_size,
            num_frames=p.data.num_frames,
            text_dim=text_dim,
            lfae=p.lfae,
            dm=p.dm,
            text=p.text,
            sampler=p.sample,
        )

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_fields(cls, sampler: Any) -> Any:  # of the params' sample section, the sampler's fields
        fields = set(SamplerConfig.model_fields)
        return sampler.model_dump(include=fields) if isinstance(sampler, SamplerConfig) else sampler


@dataclass
class Generation:
    videos: torch.Tensor  # (B, K, 3, H, W) in [0, 1]; frame 0 is the decoded x0 (identity flow)
    flow: torch.Tensor  # (B, K, h, w, 2) absolute sampling grids
    occlusion: torch.Tensor  # (B, K, 1, h, w) in [0, 1]
    z0: torch.Tensor  # (B, C, h, w) the given images' latents

    def frames(self, index: int = 0) -> np.ndarray:
        """Video ``index`` as ``(K, H, W, 3)`` uint8."""
        return to_uint8(self.videos[index])

    def save_video(self, path: str | Path, index: int = 0, fps: float = 8) -> Path:
        """Video ``index`` as ``.mp4`` or ``.gif``."""
        return write_video(path, self.frames(index), fps=fps)

    def save_flow(self, path: str | Path, index: int = 0) -> Path:
        """Video ``index``'s latent flows side by side (hue = direction, saturation = magnitude)."""
        Image.fromarray(flow_strip(self.flow[index])).save(path)
        return Path(path)


class SamplerOptionError(UserError, ValueError):
    """A sampling option that cannot be used. ``field`` is its SamplerConfig name (the ``sample`` key, the
    ``lfdm generate`` flag, the request field); the message names :meth:`LFDMPipeline.__call__`'s keyword."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{KEYWORDS.get(field, field)}: {reason}")
        self.field, self.reason = field, reason


def sampler_config(base: SamplerConfig, **options: Any) -> SamplerConfig:
    """``base``'s sampler fields with ``options`` (field → value; None keeps ``base``'s) in their place."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return SamplerConfig.model_validate(base.model_dump(include=set(SamplerConfig.model_fields)) | given)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "sampler"
        raise SamplerOptionError(field, f"{first['msg']} (got {first.get('input')!r})") from None


class LFDMPipeline:
    """The trained LFAE + DM + label embeddings. Labels missing from the embedding table (free-text
    prompts) are embedded on the fly with the same BERT checkpoint that made the table."""

    def __init__(
        self,
        config: PipelineConfig,
        lfae: LatentFlowAutoEncoder,
        diffusion: FlowDiffusion,
        embeddings: dict[str, torch.Tensor],
    ) -> None:
        if wrong := [label for label, vector in embeddings.items() if vector.shape != (config.text_dim,)]:
            raise ValueError(f"the embeddings of {wrong[:3]} are not {config.text_dim}-d (the U-Net's input)")
        self.config, self.lfae, self.diffusion = config, lfae.eval(), diffusion.eval()
        self.embeddings = embeddings
        self._bert: BertEmbedder | None = None

    @classmethod
    def from_config(
        cls, config: PipelineConfig, embeddings: dict[str, torch.Tensor] | None = None
    ) -> LFDMPipeline:
        """Untrained networks of ``config``'s shape."""
        denoiser = Unet3D(
            config.dm.unet,
            cond_channels=config.lfae.latent_channels,
            text_dim=config.text_dim,
            latent_size=config.image_size // 4,
        )
        diffusion = FlowDiffusion(denoiser, config.dm.diffusion)
        return cls(config, LatentFlowAutoEncoder(config.lfae), diffusion, embeddings or {})

    @classmethod
    def from_checkpoints(
        cls,
        lfae_path: str | Path,
        dm_path: str | Path,
        embeddings_path: str | Path | None,
        text: TextConfig,
        device: torch.device,
        sampler: SamplerConfig | None = None,
    ) -> LFDMPipeline:
        """The pipeline stages' checkpoints (``paths.lfae``, ``paths.dm``, ``paths.embeddings``)."""
        # here, not at the top: it imports the data package, which inference needs nothing else of
        from lfdm.models.lfae_checkpoints import load_lfae

        lfae, lfae_meta = load_lfae(lfae_path, device)
        diffusion, dm_meta = load_dm(dm_path, device)
        latent = lfae_meta["image_size"] // 4
        if (dm_meta["latent_size"], dm_meta["cond_channels"]) != (latent, lfae.cfg.latent_channels):
            raise ValueError(
                f"{dm_path} was trained on {dm_meta['latent_size']}px latents of {dm_meta['cond_channels']} "
                f"channels, {lfae_path} makes {latent}px latents of {lfae.cfg.latent_channels}"
            )
        config = PipelineConfig(
            image_size=lfae_meta["image_size"],
            num_frames=dm_meta["num_frames"],
            text_dim=dm_meta["text_dim"],
            lfae=lfae.cfg,
            dm=DMConfig.model_validate(dm_meta["config"]),
            text=text,
            sampler=sampler or SamplerConfig(),
        )
        table = Path(embeddings_path) if embeddings_path is not None else None
        embeddings = load_embeddings(table) if table is not None and table.exists() else {}
        return cls(config, lfae, diffusion, embeddings)

    @classmethod
    def from_params(
        cls,
        params: str | Path = "params.yaml",
        device: str | torch.device | None = None,
        *,
        lfae: str | Path | None = None,
        dm: str | Path | None = None,
    ) -> LFDMPipeline:
        """The models a pipeline run trained, as ``params`` names them: its paths are relative to its folder
        (where DVC runs the stages), the LFAE is the one ``sample.decoder`` selects (``lfae`` and ``dm``
        replace the checkpoints), the ``sample`` section is the default sampler and ``device`` its device."""
        from lfdm.models.lfae_checkpoints import sampling_lfae_path

        p, root = load_params(params), Path(params).parent
        lfae_path, dm_path = lfae or root / sampling_lfae_path(p), dm or root / p.paths.dm
        for path in (lfae_path, dm_path):
            if not Path(path).is_file():
                raise MissingInput(f"{path} does not exist: train it (`dvc repro` in {root})")
        text = p.text.model_copy(update={"checkpoint": p.text.checkpoint and str(root / p.text.checkpoint)})
        device = torch.device(device) if device is not None else resolve_device(p.device)
        return cls.from_checkpoints(lfae_path, dm_path, root / p.paths.embeddings, text, device, p.sample)

    @classmethod
    def from_pretrained(cls, path_or_uri: str | Path, device: str | torch.device = "cpu") -> LFDMPipeline:
        """A directory written by :meth:`save_pretrained`, or an MLflow model URI (``models:/lfdm@champion``,
        ``runs:/<run id>/model``) of one logged by ``lfdm.serving.log_pipeline``."""
        directory = Path(path_or_uri)
        if not directory.exists() and MODEL_URI.match(str(path_or_uri)):
            directory = _download_pipeline(str(path_or_uri))
        path = directory / CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {raw.get('format_version')!r}; lfdm reads {FORMAT_VERSION}")
            labels = raw.pop("labels")
            config = PipelineConfig.model_validate(raw)
        except FileNotFoundError:
            raise MissingInput(f"{directory}: no {CONFIG_NAME}, so no saved LFDMPipeline") from None
        except (ValueError, KeyError, AttributeError) as err:  # JSONDecodeError, ValidationError: ValueErrors
            raise UnreadableInput(f"{path}: not a pipeline config: {err}") from None
        if config.text.checkpoint is not None:
            encoder = str(directory.resolve() / config.text.checkpoint)
            text = config.text.model_copy(update={"checkpoint": encoder})
            config = config.model_copy(update={"text": text})
        try:
            table = load_file(directory / "embeddings.safetensors")["embeddings"]
            pipe = cls.from_config(config, dict(zip(labels, table, strict=True)))
            for module, name in ((pipe.lfae, "lfae"), (pipe.diffusion, "dm")):
                missing, unexpected = load_model(module, directory / f"{name}.safetensors", strict=False)
                if missing or unexpected:
                    raise ValueError(
                        f"{name}.safetensors does not fit {CONFIG_NAME}: missing "
                        f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
                    )
        except (OSError, RuntimeError, SafetensorError, ValueError, KeyError) as err:
            raise UnreadableInput(f"{directory}: unreadable saved pipeline: {err}") from None
        return pipe.to(device)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the pipeline to ``directory`` (made if needed), its config last: :meth:`from_pretrained`
        reads it back bit-exact, and never half of it."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        text = self.config.text
        if text.checkpoint is not None:  # a BERT of one's own travels with the pipeline
            source, target = Path(text.checkpoint), out / TEXT_ENCODER_DIR
            if source.resolve() != target.resolve():
                shutil.copytree(source, target, dirs_exist_ok=True)
            text = text.model_copy(update={"checkpoint": TEXT_ENCODER_DIR})
        labels = list(self.embeddings)
        vectors = list(self.embeddings.values())
        table = torch.stack(vectors) if vectors else torch.empty(0, self.config.text_dim)
        save_file({"embeddings": table.float().contiguous()}, out / "embeddings.safetensors")
        save_model(self.lfae, str(out / "lfae.safetensors"), force_contiguous=True)
        save_model(self.diffusion, str(out / "dm.safetensors"), force_contiguous=True)
        config = self.config.model_copy(update={"text": text}).model_dump(mode="json") | {"labels": labels}
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out

    def to(self, device: str | torch.device) -> LFDMPipeline:
        self.lfae.to(device)
        self.diffusion.to(device)
        self._bert = None
        return self

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_channels(self) -> int:
        return self.lfae.cfg.latent_channels

    @property
    def device(self) -> torch.device:
        return next(self.diffusion.parameters()).device

    def embed(self, labels: list[str]) -> torch.Tensor:
        missing = [label for label in labels if label not in self.embeddings]
        if missing:
            self._bert = self._bert or BertEmbedder(self.config.text, device=self.device)
            self.embeddings |= dict(zip(missing, self._bert.embed(missing).cpu(), strict=True))
        return torch.stack([self.embeddings[label] for label in labels]).to(self.device)

    def sampler_config(
        self,
        sampler: SamplerName | SamplerConfig | None = None,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        timestep_spacing: TimestepSpacing | None = None,
    ) -> SamplerConfig:
        """What a call with these arguments runs: ``sampler`` (a whole config, a name, or None for
        ``config.sampler``) with the other arguments in place of its fields. An option this model cannot run
        is a :class:`SamplerOptionError`; so is ``num_inference_steps`` for ddpm, which always samples every
        training timestep (a config's ``steps`` is ignored there, as ``sample.steps`` is)."""
        base = sampler if isinstance(sampler, SamplerConfig) else self.config.sampler
        chosen = sampler_config(
            base,
            sampler=None if isinstance(sampler, SamplerConfig) else sampler,
            steps=num_inference_steps,
            guidance=guidance_scale,
            eta=eta,
            timestep_spacing=timestep_spacing,
        )
        timesteps = self.diffusion.cfg.timesteps
        if chosen.sampler == "ddpm" and num_inference_steps not in (None, timesteps):
            raise SamplerOptionError(
                "steps",
                f"ddpm samples all {timesteps} training timesteps; ddim, dpmsolver++ or "
                "sde-dpmsolver++ take fewer",
            )
        if chosen.sampler != "ddpm" and chosen.steps > timesteps:
            raise SamplerOptionError(
                "steps", f"{chosen.steps} is more than the model's {timesteps} training timesteps"
            )
        return chosen

    def inference_steps(self, sampler: SamplerConfig) -> int:
        """The denoiser steps ``sampler`` runs."""
        return self.diffusion.cfg.timesteps if sampler.sampler == "ddpm" else sampler.steps

    def preprocess(self, image: ImageInput | list[ImageInput] | tuple[ImageInput, ...]) -> torch.Tensor:
        """One image, a sequence of them, or a batch ``(B, C, H, W)`` tensor / ``(B, H, W, C)`` array →
        ``(B, 3, S, S)`` in [0, 1] on the pipeline's device (:func:`load_image` each)."""
        if isinstance(image, (list, tuple)) or (
            isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4
        ):
            images: list[ImageInput] = list(image)
        else:
            images = [image]
        if not images:
            raise ValueError("image: no images given")
        return torch.stack([load_image(one, self.image_size) for one in images]).to(self.device)

    @torch.inference_mode()
    def __call__(
        self,
        image: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
        prompt: str | Sequence[str],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: SamplerName | SamplerConfig | None = None,
        eta: float | None = None,
        timestep_spacing: TimestepSpacing | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        precision: Precision = "fp32",
    ) -> Generation:
        """One video per image and prompt. ``image``: see :meth:`preprocess`; one image goes with every prompt
        and one prompt string with every image. The sampling arguments default to ``config.sampler``
        (:meth:`sampler_config`); ``generator`` (on the pipeline's device) fixes the noise, ``progress``
        shows a bar over the sampling steps, ``precision: bf16`` runs the networks under bf16 autocast
        (CUDA, or a CPU with AMX or AVX512-BF16)."""
        chosen = self.sampler_config(
            sampler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            timestep_spacing=timestep_spacing,
        )
        images = self.preprocess(image)
        labels = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(images) == 1 and len(labels) > 1:
            images = images.repeat(len(labels), 1, 1, 1)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if bad := [label for label in labels if not isinstance(label, str) or not label.strip()]:
            raise ValueError(f"prompt: {bad[0]!r} is no text; give the motion, e.g. 'zoom in'")
        with autocast(self.device, precision):
            features = self.lfae.encode(images)
            x = self.diffusion.sample(
                features.latent,
                self.embed(labels),
                num_frames=self.num_frames,
                sampler=chosen,
                generator=generator,
                progress=progress,
            ).float()
            if not torch.isfinite(
                x
            ).all():  # a huge guidance overflows: say so rather than decode black frames
                guidance = chosen.guidance
                raise FloatingPointError(
                    f"the sampled flow is not finite (guidance_scale {guidance} too big?)"
                )
            grid, occlusion = from_diffusion_tensor(x)
            k = self.num_frames  # every frame warps its own clip's x0 (never the previous frame)
            frames = self.lfae.decode(
                features.repeat_interleave(k),
                images.repeat_interleave(k, 0),
                grid.flatten(0, 1),
                occlusion.flatten(0, 1),
            ).float()
        return Generation(
            videos=frames.unflatten(0, (len(labels), k)),
            flow=grid,
            occlusion=occlusion,
            z0=features.latent.float(),  # Φ ran under autocast: fp32 like the rest
        )


def _download_pipeline(uri: str) -> Path:
    """The saved pipeline inside the MLflow model at ``uri``, downloaded."""
    import mlflow.artifacts  # only for model URIs

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    found = next(local.rglob(CONFIG_NAME), None)
    if found is None:
        raise MissingInput(f"{uri}: no {CONFIG_NAME} in this MLflow model (not logged by log_pipeline)")
    return found.parent


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any image → ``(H, W, 3)`` uint8: a Pillow image of any mode, or an array ``(H, W)`` or
    ``(H, W, 1|3|4)`` of uint8, 16-bit integers (uint16, or Pillow's int32 ``I``) or floats in [0, 1].
    Deeper values are rescaled, never clipped; alpha is dropped."""
    if isinstance(image, Image.Image):  # greys deeper than 8 bits keep their values; the rest become RGB
        image = np.asarray(image) if image.mode.startswith(("I", "F")) else np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or not array.size:
        raise ValueError(f"expected an image (H, W) or (H, W, 1|3|4), got an array of shape {array.shape}")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if array.dtype == np.uint8:
        return array
    if array.dtype in (np.uint16, np.int32):
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"16-bit image values lie in [0, 65535], got [{array.min()}, {array.max()}]")
        return (array / 65535 * 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError(f"float images lie in [0, 1], got [{array.min()}, {array.max()}]")
        return (array.astype(np.float64) * 255).round().astype(np.uint8)
    raise ValueError(f"expected uint8, uint16 or float pixels, got {array.dtype}")


def read_image(path: str | Path) -> np.ndarray:
    """An image file → ``(H, W, 3)`` uint8 (:func:`to_rgb`)."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableInput(f"{path}: not a readable image ({err})") from None


def load_image(image: ImageInput, size: int) -> torch.Tensor:
    """One image → ``(3, size, size)`` in [0, 1]: a file, a Pillow image or an array (:func:`to_rgb`), or a
    ``(C, H, W)`` tensor of uint8 or floats in [0, 1]. Centre square crop, then a Lanczos resize; a float RGB
    tensor already ``size`` square is taken as it is."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"expected an image tensor (C, H, W), got shape {tuple(image.shape)}")
        if image.is_floating_point() and image.shape == (3, size, size):
            if not (torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
                raise ValueError("float image tensors lie in [0, 1]")
            return image
        image = image.detach().cpu().movedim(0, -1).numpy()
    rgb = read_image(image) if isinstance(image, (str, Path)) else to_rgb(image)
    img = Image.fromarray(rgb)
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
