"""train_dm: stage two — the conditional 3D U-Net diffusion model over latent flow + occlusion.

Reads only the Zarr flow store and the label embeddings. ε- (or v-) prediction MSE, cosine schedule,
null-condition dropout; the saved model is the EMA of the weights (``train_dm.ema_max_decay``; 0 = the
last weights); resumes from ``<paths.checkpoints>/train_dm.pt`` after an interruption.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from lfdm import distributed, tracking
from lfdm.config import Params, SamplerConfig
from lfdm.data import FlowSequenceDataset, FlowStore, read_manifest
from lfdm.device import resolve_device
from lfdm.diffusion import FlowDiffusion, save_dm
from lfdm.models.unet3d import Unet3D
from lfdm.models.warp import from_diffusion_tensor
from lfdm.text import load_embeddings
from lfdm.training import TrainingState, adam, fit, lr_schedule, seed_everything, sharded_loader
from lfdm.viz import flow_strip

TARGET_FIT_CLIPS = 1024  # training clips, evenly spaced, that set the displacement scale (bounded memory)


def run(p: Params) -> dict[str, float]:
    cfg, device = p.train_dm, distributed.init(resolve_device(p.device))
    generator = seed_everything(p.seed + distributed.rank())  # own noise, t and dropout per process
    embeddings = load_embeddings(p.paths.embeddings)
    attrs = FlowStore(p.paths.flows).attrs
    sequences = FlowSequenceDataset(p.paths.flows, read_manifest(p.paths.manifest, split="train"), embeddings)
    loader = sharded_loader(
        sequences,
        cfg.batch_size,
        "train_dm.batch_size",
        seed=p.seed,
        num_workers=cfg.num_workers,
        generator=generator,
    )
    text_dim = next(iter(embeddings.values())).numel()
    denoiser = Unet3D(
        p.dm.unet, cond_channels=attrs.latent_channels, text_dim=text_dim, latent_size=attrs.latent_size
    )
    diffusion = FlowDiffusion(denoiser, p.dm.diffusion)
    measured = torch.linspace(0, len(sequences) - 1, min(len(sequences), TARGET_FIT_CLIPS)).long()
    diffusion.fit_target(torch.stack([sequences.item(int(i))["x0"] for i in measured]))
    diffusion.to(device)
    optimizer = adam(diffusion.parameters(), cfg.lr, cfg.betas)
    schedule = lr_schedule(optimizer, cfg.lr_schedule, cfg.steps, cfg.milestones, cfg.gamma)
    ema = (
        EMAModel(diffusion.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True)
        if cfg.ema_max_decay
        else None
    )
    config = p.model_dump(mode="json", include={"seed", "dm", "train_dm"}) | {"flows": asdict(attrs)}
    state = TrainingState(
        Path(p.paths.checkpoints) / "train_dm.pt", diffusion, optimizer, schedule, config, ema
    )
    parallel = distributed.wrap(diffusion, device)  # its forward is the loss; `diffusion` is what is saved
    diffusion.train()

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        return {"diffusion": parallel(batch["x0"], batch["z0"], batch["text"])}

    fit(
        "train_dm",
        state,
        loader,
        loss,
        cfg,
        objective="diffusion",
        device=device,
        precision=p.precision,
        grad_clip=cfg.grad_clip,
    )
    if ema is not None:
        ema.copy_to(diffusion.parameters())
    if distributed.is_main():
        save_dm(
            p.paths.dm,
            diffusion,
            p.dm,
            cond_channels=attrs.latent_channels,
            text_dim=text_dim,
            num_frames=attrs.num_frames,
            latent_size=attrs.latent_size,
            step=state.step,
        )
        _log_sample(p, diffusion, sequences.item(0), device)
    state.write_plot(Path(p.paths.plots) / "train_dm.tsv")
    state.finish()
    recent = [row["loss/diffusion"] for row in state.history[-5:]]
    return {"loss": sum(recent) / len(recent), "steps": state.step}


def _log_sample(p: Params, diffusion: FlowDiffusion, clip: dict, device: torch.device) -> None:
    """The first training clip's latent flows (top row) and the saved model's for its x0 and label (bottom;
    :class:`SamplerConfig`'s default sampler, not ``sample``'s, which is no param of this stage) as the run's
    picture: has the model learnt the training motion? Its own generator, so nothing saved depends on it."""
    if tracking.active_run_id() is None:
        return
    diffusion.eval()
    with torch.inference_mode():
        sampled = diffusion.sample(
            clip["z0"][None].to(device),
            clip["text"][None].to(device),
            num_frames=clip["x0"].shape[1],
            sampler=SamplerConfig(),
            generator=torch.Generator(device).manual_seed(p.seed),
        )
    real, _ = from_diffusion_tensor(clip["x0"][None])
    generated, _ = from_diffusion_tensor(sampled.float().cpu())
    picture = np.concatenate((flow_strip(real[0]), flow_strip(generated[0])))
    tracking.log_image(picture, "flows_real_vs_sampled.png")
