"""finetune_decoder: adapt the decoder Ω to a new domain (paper Sec. 4.3, Table 5); off by default.

Enabled (``finetune_decoder.enabled``): the new domain's videos (``finetune_decoder.dataset/root/crop``,
sized and sampled as ``data``) are prepared into ``<paths.finetune>/frames.zarr`` + ``manifest.parquet``;
Φ and F of the trained LFAE are frozen (kept in eval mode, so their batch-norm statistics stay too) and Ω
alone trains on frame pairs of the train split with the perceptual loss (the equivariance loss only
concerns F). Writes ``<paths.finetune>/lfae.pt``, the LFAE with the fine-tuned Ω, which ``sample`` uses with
``sample.decoder: finetuned``. Metrics on the new domain's test clips, for the trained and the fine-tuned
decoder: self-reconstruction L1 (each of the K frames rendered from x0 with the flow F estimates to it;
per pixel, per frame, frame 0 excluded) and the frame Fréchet distances ``fid_i3d`` and ``fid_mobilenetv2``
(which Ω's perceptual loss trains against) of those frames against the real ones.

Disabled: ``<paths.finetune>`` holds only a ``DISABLED`` note (DVC needs the out to exist).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from lfdm import tracking
from lfdm.config import Params
from lfdm.data import FramePairDataset, FrameStore, ManifestRow, read_manifest, to_tensor
from lfdm.data.prepare import prepare_dataset
from lfdm.device import resolve_device
from lfdm.losses import PerceptualLoss
from lfdm.metrics import feature_frechet_distance, load_i3d
from lfdm.metrics.evaluation import FRAME_METRICS, frame_extractors
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.lfae_checkpoints import finetuned_lfae_path, load_lfae, save_lfae
from lfdm.training import TrainingState, adam, fit, seed_everything, sharded_loader
from lfdm.viz import reconstruction_strip


def run(p: Params) -> dict[str, float]:
    cfg, out = p.finetune_decoder, Path(p.paths.finetune)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not cfg.enabled:
        (out / "DISABLED").write_text("finetune_decoder.enabled is false in params.yaml\n")
        return {"enabled": 0}

    device = resolve_device(p.device)
    generator = seed_everything(p.seed)
    frames, manifest = out / "frames.zarr", out / "manifest.parquet"
    prepared = prepare_dataset(
        p.finetune_data, p.seed, frames, manifest, out / "skipped.json", key="finetune_decoder"
    )
    trained, meta = load_lfae(p.paths.lfae, device)
    if meta["image_size"] != p.data.image_size:
        raise ValueError(
            f"{p.paths.lfae} was trained at {meta['image_size']} px but data.image_size is {p.data.image_size}"
        )
    model = copy.deepcopy(trained)
    frozen = (model.encoder, model.flow_predictor)
    for module in frozen:
        module.requires_grad_(False)

    pairs = FramePairDataset(FrameStore(frames), read_manifest(manifest, split="train"), seed=p.seed)
    loader = sharded_loader(
        pairs,
        cfg.batch_size,
        "finetune_decoder.batch_size",
        seed=p.seed,
        num_workers=cfg.num_workers,
        generator=generator,
    )
    perceptual = PerceptualLoss(p.train_lfae.perceptual).to(device)
    optimizer = adam(model.decoder.parameters(), cfg.lr, cfg.betas)
    schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    config = p.model_dump(mode="json", include={"seed", "data", "finetune_decoder"}) | {
        "lfae_step": meta["step"]
    }
    state = TrainingState(
        Path(p.paths.checkpoints) / "finetune_decoder.pt", model, optimizer, schedule, config
    )

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        source, driving = batch["source"], batch["driving"]
        with torch.no_grad():  # Φ and F are frozen: no graph through them
            features, motion = model.encode(source), model.flow_predictor(source, driving)
        return {
            "perceptual": perceptual(model.decode(features, source, motion.flow, motion.occlusion), driving)
        }

    model.decoder.train()
    fit(
        "finetune_decoder",
        state,
        loader,
        loss,
        cfg,
        objective="perceptual",
        device=device,
        precision=p.precision,
    )
    model.eval()
    save_lfae(finetuned_lfae_path(p), model, model.cfg, image_size=p.data.image_size, step=state.step)
    state.write_plot(Path(p.paths.plots) / "finetune_decoder.tsv")
    state.finish()
    metrics = compare_decoders(
        trained, model, FrameStore(frames), read_manifest(manifest, split="test"), device
    )
    return (
        {"enabled": 1, "steps": state.step, "loss": state.history[-1]["loss/perceptual"]}
        | metrics
        | {f"new_domain/{key}": value for key, value in prepared.items()}
    )


@torch.inference_mode()
def compare_decoders(
    trained: LatentFlowAutoEncoder,
    finetuned: LatentFlowAutoEncoder,
    store: FrameStore,
    rows: list[ManifestRow],
    device: torch.device,
) -> dict[str, float]:
    """Self-reconstruction L1, fid_i3d and fid_mobilenetv2 of both decoders on the clips ``rows`` (same Φ, F)."""
    real, recon, l1 = [], {"trained": [], "finetuned": []}, {"trained": [], "finetuned": []}
    for i, row in enumerate(tqdm(rows, desc="finetune_decoder: evaluate", unit="clip")):
        clip = to_tensor(store.read(row.video_id, row.frame_indices)).to(device)  # (K, 3, H, W)
        source = clip[:1].expand_as(clip)
        motion = finetuned.flow_predictor(source, clip)
        features = finetuned.encode(clip[:1])
        for name, model in (("trained", trained), ("finetuned", finetuned)):
            frames = model.decode(features, clip[:1], motion.flow, motion.occlusion)
            l1[name].append((frames - clip)[1:].abs().mean(dim=(1, 2, 3)).cpu())
            recon[name].append(frames[1:].cpu())
        real.append(clip[1:].cpu())
        if i == 0:  # x0 | real frame | fine-tuned reconstruction | flow, for the last frames of one clip
            tracking.log_image(
                reconstruction_strip(source[-4:], clip[-4:], frames[-4:], motion.flow[-4:]),
                "finetuned_reconstructions.png",
            )
    extractors = frame_extractors(load_i3d().to(device), device)
    real_features = {key: extractor(torch.cat(real)) for key, extractor in extractors.items()}
    metrics: dict[str, float] = {"test_frames": sum(len(r) for r in real)}
    for name in ("trained", "finetuned"):
        metrics[f"l1/{name}"] = float(torch.cat(l1[name]).mean())
        for metric, key in FRAME_METRICS.items():
            fake_features = extractors[key](torch.cat(recon[name]))
            metrics[f"{metric}/{name}"] = feature_frechet_distance(real_features[key], fake_features)
    return metrics
