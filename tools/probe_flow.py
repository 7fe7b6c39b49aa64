"""How well does an LFAE's flow predictor F see the embedded dataset's camera motions?

The embedded clips are rendered with a known camera (``Clip.camera``), so the exact flow between any two
frames is known (:func:`lfdm.data.embedded.true_flow`). For every clip of a split this compares F's flow
from the first to the last frame with the exact one:

- ``epe``: mean end-point error (grid units: the frame side is 2), beside ``still``, the error of
  predicting no motion at all: a flow predictor that has learned nothing scores epe ≈ still;
- each flow fitted with one affine map (least squares) and read as translation (tx, ty), log scale and
  rotation; per label the mean of F's fit beside the exact flow's fit;
- ``ratio``: the part of F's motion along the exact motion (1 = the right size), and ``acc``: the
  share of clips whose motion is nearest (cosine) to their own label's exact motion (chance 1/8).

    python tools/probe_flow.py --lfae data/models/lfae.pt             # the pipeline's LFAE, test clips
    python tools/probe_flow.py --lfae ckpt.pt --split train --params params.yaml
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from lfdm.checkpoint import load_checkpoint
from lfdm.config import LFAEConfig, load_params
from lfdm.data.embedded import MOTIONS, generate_clips, true_flow
from lfdm.data.frames import to_tensor
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.warp import identity_grid

COMPONENTS = ("tx", "ty", "log_scale", "rotation")


def fit_affine(flow: torch.Tensor) -> np.ndarray:
    """``flow (N, h, w, 2)`` backward grids → ``(N, 4)`` (tx, ty, log scale, rotation in radians) of their
    least-squares affine fits ``grid ≈ A·z + t``."""
    n, h, w, _ = flow.shape
    z = identity_grid(h, w).reshape(-1, 2).double()
    design = torch.cat((z, torch.ones(len(z), 1, dtype=z.dtype)), dim=1)  # (hw, 3)
    coef = torch.linalg.lstsq(design.expand(n, -1, -1), flow.reshape(n, -1, 2).double()).solution  # (N, 3, 2)
    a, t = coef[:, :2].transpose(1, 2), coef[:, 2]  # A maps z (a column) → grid
    log_scale = 0.5 * torch.log(torch.linalg.det(a).abs().clamp_min(1e-12))
    rotation = torch.atan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1])
    return torch.stack((t[:, 0], t[:, 1], log_scale, rotation), dim=1).numpy()


def load_any_lfae(path: str) -> LatentFlowAutoEncoder:
    """A trained LFAE (``paths.lfae``) or a training stage's resume checkpoint (which holds all params)."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]["lfae"] if "optimizer" in ckpt else ckpt["config"]
    model = LatentFlowAutoEncoder(LFAEConfig.model_validate(config))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lfae", required=True, help="LFAE checkpoint (a trained model or a resume state)")
    parser.add_argument("--params", default="params.yaml", help="the params whose embedded dataset to render")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    args = parser.parse_args()

    p = load_params(args.params)
    if p.data.dataset != "embedded":
        raise SystemExit(
            f"{args.params}: data.dataset is {p.data.dataset!r}; only embedded clips carry their camera"
        )
    model, h = load_any_lfae(args.lfae), p.data.image_size // 4
    clips = [clip for clip in generate_clips(p.data, p.seed) if clip.split == args.split]
    with torch.no_grad():
        pairs = to_tensor(np.stack([clip.frames[[0, -1]] for clip in clips]))
        flow = torch.cat([model.flow_predictor(b[:, 0], b[:, 1]).flow for b in pairs.split(16)])
    exact_flows = []
    for clip in clips:
        assert clip.camera is not None  # every embedded clip has its camera
        exact_flows.append(true_flow(clip.camera, 0, len(clip.frames) - 1, h, p.data.image_size))
    truth = torch.from_numpy(np.stack(exact_flows))
    epe = (flow - truth).norm(dim=-1).mean(dim=(1, 2)).numpy()
    still = (identity_grid(h, h) - truth).norm(dim=-1).mean(dim=(1, 2)).numpy()
    fitted, exact = fit_affine(flow), fit_affine(truth)

    labels = list(MOTIONS)
    by_label = defaultdict(list)
    for i, clip in enumerate(clips):
        by_label[clip.label].append(i)
    amplitude = (
        np.abs(exact).reshape(len(clips), -1).max(axis=0) + 1e-6
    )  # make the four components comparable
    prototypes = np.stack([exact[by_label[label]].mean(0) for label in labels]) / amplitude
    normed = fitted / amplitude
    cosine = (
        normed
        @ prototypes.T
        / (np.linalg.norm(normed, axis=1, keepdims=True) * np.linalg.norm(prototypes, axis=1) + 1e-12)
    )
    correct = np.array([labels[k] == clip.label for k, clip in zip(cosine.argmax(1), clips, strict=True)])

    print(f"{args.lfae}: {len(clips)} {args.split} clips, flow from the first to the last frame")
    print(
        f"{'label':<25}"
        + "".join(f"{c:>18}" for c in COMPONENTS)
        + f"{'ratio':>7}{'acc':>6}{'epe':>7}{'still':>7}"
    )
    for label in labels:
        if not (idx := by_label[label]):
            continue
        along = exact[idx] / amplitude
        ratio = float(((normed[idx] * along).sum(1) / (along * along).sum(1)).mean())
        cells = "".join(
            f"{m:>+9.3f} ({t:+.2f})" for m, t in zip(fitted[idx].mean(0), exact[idx].mean(0), strict=True)
        )
        print(
            f"{label:<25}{cells}{ratio:>7.2f}{correct[idx].mean():>6.2f}{epe[idx].mean():>7.3f}{still[idx].mean():>7.3f}"
        )
    print(
        f"all: motion accuracy {correct.mean():.3f} (chance {1 / len(labels):.3f}), "
        f"epe {epe.mean():.3f} vs {still.mean():.3f} for no motion"
    )


if __name__ == "__main__":
    main()
