"""pretrain_flow: stage one's flow predictor F learns the training clips' motion from a classical teacher.

OpenCV's DIS (or Farneback) computes the flow of frame pairs of the **training** clips, label-free, in the
LFAE's convention (:mod:`lfdm.teacher`); the flows are kept in ``paths.teacher_flows`` and recomputed only
for clips that are new or changed, or when the teacher's settings change. F alone (region, background and
pixel-wise predictors, occlusion head) is then trained on them (:func:`lfdm.losses.distillation_loss`) and
saved to ``paths.flow_predictor``, recording which clips it saw; ``train_lfae`` starts from it.

Graded on the **test** clips, the pairs the diffusion model's flows are made of (x0 → each of the K frames):
how much of the static baseline's L1 error is left after warping x0 with the teacher's flow and with F's,
F's end-point error against the teacher, and how much of F's flow each kind of motion carries. Where a dataset
knows the exact flow (the embedded one), the teacher's and F's end-point errors against it; that flow
never trains anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lfdm import tracking
from lfdm.config import Params
from lfdm.data import FrameStore, ManifestRow, read_manifest, to_tensor
from lfdm.data.embedded import generate_clips, true_flow
from lfdm.data.teacher_store import TeacherFlowStore, TeacherPairDataset, TeacherSettings
from lfdm.device import resolve_device
from lfdm.losses import distillation_loss
from lfdm.models.lfae import FlowPredictor, LatentFlowAutoEncoder
from lfdm.models.lfae_checkpoints import save_flow_predictor, trained_on
from lfdm.models.warp import identity_grid, warp
from lfdm.teacher import teacher_flows
from lfdm.training import TrainingState, adam, fit, lr_schedule, seed_everything, sharded_loader
from lfdm.viz import flow_to_rgb, occlusion_to_rgb, to_uint8, video_grid


def run(p: Params) -> dict[str, float]:
    cfg, device = p.pretrain_flow, resolve_device(p.device)
    generator = seed_everything(p.seed)
    frames = FrameStore(p.paths.frames)
    train = read_manifest(p.paths.manifest, split="train")
    settings = TeacherSettings(
        cfg.teacher, cfg.teacher_scale, cfg.pairs_per_clip, p.data.image_size // 4, p.seed
    )
    teacher = TeacherFlowStore(p.paths.teacher_flows, mode="a")
    metrics: dict[str, float] = teacher.update(frames, train, settings)
    pairs = TeacherPairDataset(frames, teacher, [r.video_id for r in train], seed=p.seed, augment=cfg.augment)
    loader = sharded_loader(
        pairs,
        cfg.batch_size,
        "pretrain_flow.batch_size",
        seed=p.seed,
        num_workers=cfg.num_workers,
        generator=generator,
    )

    model = LatentFlowAutoEncoder(p.lfae)  # only F trains and is saved; it is built inside its LFAE's config
    flow_predictor = model.flow_predictor.to(device)
    optimizer = adam(flow_predictor.parameters(), cfg.lr, cfg.betas)
    schedule = lr_schedule(optimizer, "linear", cfg.steps, (), 1.0)
    config = p.model_dump(mode="json", include={"seed", "data", "lfae", "pretrain_flow"})
    state = TrainingState(
        Path(p.paths.checkpoints) / "pretrain_flow.pt", flow_predictor, optimizer, schedule, config
    )

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        source, driving = batch["source"], batch["driving"]
        out = flow_predictor(source, driving)
        return distillation_loss(out, flow_predictor, source, driving, batch["grid"], batch["reliable"], cfg)

    flow_predictor.train()
    fit("pretrain_flow", state, loader, loss, cfg, objective="total", device=device)
    save_flow_predictor(
        p.paths.flow_predictor,
        model,
        image_size=p.data.image_size,
        step=state.step,
        data=trained_on(p.data, p.seed, train),
    )
    state.write_plot(Path(p.paths.plots) / "pretrain_flow.tsv")
    state.finish()
    metrics |= {"loss": state.history[-1]["loss/flow"], "steps": state.step}
    return metrics | grade(
        p, flow_predictor.eval(), frames, read_manifest(p.paths.manifest, split="test"), device
    )


def grade(
    p: Params,
    flow_predictor: FlowPredictor,
    frames: FrameStore,
    tests: list[ManifestRow],
    device: torch.device,
) -> dict[str, float]:
    """The test clips' x0 → x_i pairs (the manifest's frame indices): the share of the static baseline's L1 left
    after warping x0 with the teacher's and with F's flow (edges repeated outside the frame), F's end-point
    error against the teacher, the share of F's flow each kind of motion carries (its masks' mean), and, for the embedded
    dataset, both end-point errors against the exact flow (grid units: the frame is 2 wide)."""
    cfg, h = p.pretrain_flow, p.data.image_size // 4
    clips = [frames.read(r.video_id, r.frame_indices) for r in tests]
    sources = np.concatenate([clip[:1].repeat(len(clip) - 1, axis=0) for clip in clips])
    drivings = np.concatenate([clip[1:] for clip in clips])
    teacher = teacher_flows(sources, drivings, h, cfg.teacher, cfg.teacher_scale)[0].grid
    source, driving = to_tensor(sources), to_tensor(drivings)
    with torch.inference_mode():
        outs = [
            flow_predictor(s.to(device), d.to(device))
            for s, d in zip(source.split(64), driving.split(64), strict=True)
        ]
    flow = torch.cat([o.flow for o in outs]).cpu()
    shares = torch.cat([o.masks.mean(dim=(2, 3)) for o in outs]).mean(
        0
    )  # per motion: background, regions (, local)
    local = outs[0].local is not None
    static = (source - driving).abs().mean()

    def left(grid: torch.Tensor) -> float:
        return float((warp(source, grid, padding="border") - driving).abs().mean() / static)

    metrics = {
        "warp_l1_ratio/teacher": left(teacher),
        "warp_l1_ratio/flow_predictor": left(flow),
        "epe/flow_predictor_vs_teacher": float((flow - teacher).norm(dim=-1).mean()),
        "mask_share/background": float(shares[0]),
        "mask_share/regions": float(shares[1 : len(shares) - local].sum()),
    }
    if local:
        metrics["mask_share/local"] = float(shares[-1])
    if p.data.dataset == "embedded":
        cameras = {  # every embedded clip has its camera
            c.video_id: c.camera
            for c in generate_clips(p.data, p.seed)
            if c.split == "test" and c.camera is not None
        }
        exact = torch.from_numpy(
            np.stack(
                [
                    true_flow(cameras[r.video_id], r.frame_indices[0], i, h, p.data.image_size)
                    for r in tests
                    for i in r.frame_indices[1:]
                ]
            )
        )
        metrics |= {
            f"epe/{name}": float((grid - exact).norm(dim=-1).mean())
            for name, grid in (("teacher", teacher), ("flow_predictor", flow), ("still", identity_grid(h, h)))
        }
    _log_picture(driving, teacher, torch.cat([o.occlusion for o in outs]).cpu(), flow, len(clips[0]) - 1)
    return metrics


def _log_picture(
    driving: torch.Tensor, teacher: torch.Tensor, occlusion: torch.Tensor, flow: torch.Tensor, per_clip: int
) -> None:
    """The last frame of up to 8 test clips: frame | teacher's flow | F's flow | F's occlusion, one row each."""
    last = torch.arange(per_clip - 1, len(driving), per_clip)[:8]
    size = driving.shape[-1]

    def up(x: np.ndarray) -> np.ndarray:
        return x.repeat(size // x.shape[1], axis=1).repeat(size // x.shape[2], axis=2)

    rows = zip(
        to_uint8(driving[last]),
        up(flow_to_rgb(teacher[last])),
        up(flow_to_rgb(flow[last])),
        up(occlusion_to_rgb(occlusion[last])),
        strict=True,
    )
    tracking.log_image(
        video_grid([cell for row in rows for cell in row], columns=4, scale=2)[0], "teacher_vs_flow.png"
    )
