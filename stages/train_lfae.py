"""train_lfae: stage one — the latent flow auto-encoder on (reference, driving) frame pairs.

Loss: perceptual pyramid + equivariance (MRAA), Adam with MultiStep decay. F starts from ``train_lfae.init``:
``pretrain_flow``'s distilled F by default (as the official code starts from pretrained MRAA), another
checkpoint, or nothing; with ``train_lfae.freeze_motion`` its flow stays fixed and only Φ, Ω and the
occlusion head learn.
Resumes from ``<paths.checkpoints>/train_lfae.pt`` when re-run after an interruption with the same params.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lfdm import distributed, tracking
from lfdm.config import Params
from lfdm.data import FramePairDataset, FrameStore, read_manifest
from lfdm.device import resolve_device
from lfdm.losses import PerceptualLoss, lfae_loss
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.lfae_checkpoints import init_lfae, save_lfae, trained_on
from lfdm.training import TrainingState, adam, fit, multistep_schedule, seed_everything, sharded_loader
from lfdm.viz import reconstruction_strip


def run(p: Params) -> dict[str, float]:
    cfg, device = p.train_lfae, distributed.init(resolve_device(p.device))
    generator = seed_everything(p.seed + distributed.rank())  # own random transforms per process
    train = read_manifest(p.paths.manifest, split="train")
    pairs = FramePairDataset(FrameStore(p.paths.frames), train, seed=p.seed)
    loader = sharded_loader(
        pairs,
        cfg.batch_size,
        "train_lfae.batch_size",
        seed=p.seed,
        num_workers=cfg.num_workers,
        generator=generator,
    )
    model = LatentFlowAutoEncoder(p.lfae)
    if cfg.init:
        init = p.paths.flow_predictor if cfg.init == "pretrain_flow" else cfg.init
        tests = [r.video_id for r in read_manifest(p.paths.manifest, split="test")]
        init_lfae(model, init, p.data.image_size, p.data, tests)
    if cfg.freeze_motion:
        model.flow_predictor.freeze_motion()
    model = model.to(device)
    perceptual = PerceptualLoss(cfg.perceptual).to(device)
    optimizer = adam([q for q in model.parameters() if q.requires_grad], cfg.lr, cfg.betas)
    schedule = multistep_schedule(optimizer, cfg.steps, cfg.milestones, cfg.gamma)
    config = p.model_dump(mode="json", include={"seed", "data", "lfae", "train_lfae"})
    state = TrainingState(Path(p.paths.checkpoints) / "train_lfae.pt", model, optimizer, schedule, config)
    parallel = distributed.wrap(model, device)  # the forward pass to train through; `model` is what is saved
    model.train()

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        out = parallel(batch["source"], batch["driving"])
        return lfae_loss(
            out["prediction"],
            batch["driving"],
            model.flow_predictor.region_predictor,
            out["driving_regions"],
            perceptual,
            cfg.equivariance,
        )

    fit("train_lfae", state, loader, loss, cfg, objective="total", device=device, precision=p.precision)
    if distributed.is_main():
        save_lfae(
            p.paths.lfae,
            model,
            p.lfae,
            image_size=p.data.image_size,
            step=state.step,
            data=trained_on(p.data, p.seed, train),
        )
        assert state.batches is not None  # fit() made the stream
        _log_reconstructions(model, next(state.batches), device)
    state.write_plot(Path(p.paths.plots) / "train_lfae.tsv")
    state.finish()
    return {"loss": state.history[-1]["loss/total"], "steps": state.step}


def _log_reconstructions(model: LatentFlowAutoEncoder, batch: dict, device: torch.device) -> None:
    """Source, driving, reconstruction and flow of up to 4 pairs of ``batch`` as an MLflow picture."""
    model.eval()
    source, driving = (batch[key][:4].to(device) for key in ("source", "driving"))
    with torch.no_grad():
        out = model(source, driving)
    tracking.log_image(
        reconstruction_strip(source, driving, out["prediction"], out["flow"]), "reconstructions.png"
    )
