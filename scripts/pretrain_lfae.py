"""Pretrain the LFAE that the default pipeline starts from (``train_lfae.init``).

The official code starts stage one from MRAA weights pretrained without labels for days on GPUs; on a
2-core CPU a motion estimator does not emerge that way in any time a user would wait (docs/model.md).
This script makes the warm start for the embedded dataset from its *training* clips only, the way
optical-flow networks are pretrained on synthetic motion (FlowNet's Flying Chairs): the embedded clips
are rendered with a known camera, so the exact flow between two frames is known
(:func:`lfdm.data.embedded.true_flow`) and F can learn it directly.

0. ``--background-steps``: F's background predictor alone, L1 between its affine grid and the exact
   flow. A camera motion is one affine map per frame pair, which is what that predictor outputs, and it
   learns it eight times cheaper per step than the whole F (0.02 s/step on 2 CPU threads).
1. ``--flow-steps``: F alone, L1 between its flow and the exact flow (0.18 s/step on one CPU thread).
2. ``--steps``: the whole LFAE with the paper's losses (perceptual pyramid + equivariance) plus
   ``--flow-weight`` × that L1, so Ω learns to render from the flows F now gives. With
   ``train_lfae.freeze_motion`` (the default) F's flow stays as phase 1 left it and Φ, Ω and the
   occlusion head learn from the perceptual loss alone, as in the pipeline's ``train_lfae``.

The pipeline's ``train_lfae`` then fine-tunes the result with the paper's losses alone. The checkpoint is
written every ``--save-every`` steps, so a long run can be inspected (scripts/probe_flow.py) while it
goes on. An unsupervised pretraining is just a longer ``train_lfae`` (``dvc exp run -S train_lfae.steps=N``).

    python scripts/pretrain_lfae.py --background-steps 12000 --flow-steps 16000 --steps 1000 \
        --out assets/lfae-embedded-64.pt

``--init`` continues from a checkpoint; submodules whose architecture changed since start fresh (listed).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lfdm.checkpoint import load_checkpoint
from lfdm.config import Params, load_params
from lfdm.data.embedded import Clip, generate_clips, true_flow
from lfdm.data.frames import to_tensor
from lfdm.losses import PerceptualLoss, lfae_loss
from lfdm.models.checkpoints import save_lfae
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.training import adam, forever, multistep_schedule, seed_everything


class CameraPairs(Dataset):
    """Two frames of one embedded clip, drawn like ``FramePairDataset`` (time-sorted, with replacement),
    and the exact backward flow between them at the latent size.

    ``augment``: each pair also mirrored left-right, up-down and/or transposed at random (the eight
    symmetries of the square), its flow mapped with it, so that F sees eight times the textures."""

    def __init__(self, clips: list[Clip], latent_size: int, seed: int, *, augment: bool = False) -> None:
        self.clips, self.latent_size, self.seed, self.augment, self.epoch = clips, latent_size, seed, augment, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.clips[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        source, driving = np.sort(rng.integers(0, len(clip.frames), size=2))
        pair = to_tensor(clip.frames[[source, driving]])
        flow = torch.from_numpy(true_flow(clip.camera, source, driving, self.latent_size))
        if self.augment:
            pair, flow = symmetry(pair, flow, *rng.integers(0, 2, size=3).astype(bool))
        return {"source": pair[0], "driving": pair[1], "flow": flow}


def symmetry(frames: torch.Tensor, flow: torch.Tensor, mirror_x: bool, mirror_y: bool, transpose: bool):
    """``frames (..., H, W)`` and their backward grid ``flow (h, w, 2)`` under one symmetry of the square:
    a mirrored frame's grid is the mirrored grid with that coordinate negated, a transposed frame's the
    transposed grid with x and y swapped."""
    if mirror_x:
        frames, flow = frames.flip(-1), flow.flip(1) * torch.tensor([-1.0, 1.0])
    if mirror_y:
        frames, flow = frames.flip(-2), flow.flip(0) * torch.tensor([1.0, -1.0])
    if transpose:
        frames, flow = frames.transpose(-1, -2), flow.transpose(0, 1).flip(-1)
    return frames.contiguous(), flow.contiguous()


PHASES = {"background": "background, flow L1", "flow": "F, flow L1", "full": "LFAE + flow"}


def train(model: LatentFlowAutoEncoder, loader: DataLoader, p: Params, args: argparse.Namespace, phase: str) -> None:
    """``--background-steps`` of F's background predictor, ``--flow-steps`` of F or ``--steps`` of the LFAE."""
    cfg = p.train_lfae
    steps = {"background": args.background_steps, "flow": args.flow_steps, "full": args.steps}[phase]
    if not steps:
        return
    full, flow_predictor = phase == "full", model.flow_predictor
    trained = {"background": flow_predictor.background_predictor, "flow": flow_predictor, "full": model}[phase]
    if trained is None:
        raise SystemExit(f"{args.params}: --background-steps needs lfae.use_background: true")
    perceptual = PerceptualLoss(cfg.perceptual) if full else None
    flow_weight = args.flow_weight
    if full and cfg.freeze_motion:
        flow_predictor.freeze_motion()
        flow_weight = 0.0  # the flow term, like the equivariance loss, would only train the frozen F
    parameters = [q for q in trained.parameters() if q.requires_grad]
    optimizer = adam(parameters, args.lr or cfg.lr, cfg.betas)
    schedule = multistep_schedule(optimizer, steps, cfg.milestones, cfg.gamma)
    model.train()
    batches = forever(loader)
    with tqdm(total=steps, desc=PHASES[phase], unit="step") as bar:
        for step in range(1, steps + 1):
            batch = next(batches)
            if full:
                out = model(batch["source"], batch["driving"])
                losses = lfae_loss(out["prediction"], batch["driving"], flow_predictor.region_predictor,
                                   out["driving_regions"], perceptual, cfg.equivariance)
                flow_l1 = (out["flow"] - batch["flow"]).abs().mean()
                total = losses["total"] + flow_weight * flow_l1
            else:
                if phase == "flow":
                    flow = flow_predictor(batch["source"], batch["driving"]).flow
                else:
                    affine = trained(batch["source"], batch["driving"])[:, :2]
                    flow = F.affine_grid(affine, [len(affine), 1, *batch["flow"].shape[1:3]], align_corners=True)
                total = flow_l1 = (flow - batch["flow"]).abs().mean()
            if not math.isfinite(total.item()):
                raise FloatingPointError(f"loss is {total.item()} at step {step}; the last good weights are in {args.out}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            if step % cfg.log_every == 0:
                bar.set_postfix(flow_l1=f"{flow_l1.item():.4f}", total=f"{total.item():.3f}")
            if step % args.save_every == 0 or step == steps:
                save_lfae(args.out, model, p.lfae, image_size=p.data.image_size, step=step)


def load_matching(model: LatentFlowAutoEncoder, path: str) -> None:
    """Load checkpoint ``path`` into ``model`` but for the submodules (``flow_predictor.background_predictor``,
    ``decoder.bottleneck``, …) whose tensors changed name or shape: those start fresh as a whole."""
    theirs, ours = load_checkpoint(path)["model"], model.state_dict()

    def module(key: str) -> str:
        return ".".join(key.split(".")[:2])

    changed = {module(k) for k in ours.keys() ^ theirs.keys()}
    changed |= {module(k) for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape}
    model.load_state_dict({k: v for k, v in theirs.items() if module(k) not in changed}, strict=False)
    if changed:
        print(f"{path}: {', '.join(sorted(changed))} start fresh (changed since that checkpoint)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the pipeline params to pretrain for")
    parser.add_argument("--background-steps", type=int, default=12000,
                        help="steps of F's background predictor alone on the exact flow")
    parser.add_argument("--flow-steps", type=int, default=16000, help="steps of F alone on the exact flow")
    parser.add_argument("--steps", type=int, default=1000, help="steps of the whole LFAE afterwards")
    parser.add_argument("--flow-weight", type=float, default=100.0, help="weight of the flow L1 in those steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (0: train_lfae.lr)")
    parser.add_argument("--init", help="start from this LFAE checkpoint (e.g. to go on with --flow-steps 0)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="mirror and transpose the frame pairs at random (CameraPairs)")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--out", default="assets/lfae-embedded-64.pt")
    args = parser.parse_args()

    p = load_params(args.params)
    if p.data.dataset != "embedded":
        raise SystemExit(f"{args.params}: data.dataset is {p.data.dataset!r}; only embedded clips carry their camera")
    generator = seed_everything(p.seed)
    clips = [clip for clip in generate_clips(p.data, p.seed) if clip.split == "train"]
    pairs = CameraPairs(clips, p.data.image_size // 4, p.seed, augment=args.augment)
    loader = DataLoader(pairs, batch_size=p.train_lfae.batch_size,
                        shuffle=True, drop_last=True, generator=generator)
    model = LatentFlowAutoEncoder(p.lfae)
    if args.init:
        load_matching(model, args.init)
    print(f"{len(clips)} training clips; F's background predictor alone for {args.background_steps} steps, "
          f"F alone for {args.flow_steps}, then the LFAE for {args.steps}")
    for phase in PHASES:
        train(model, loader, p, args, phase)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
