"""``python -m stages <name> [--params params.yaml]`` — the command every dvc.yaml stage runs."""

from __future__ import annotations

import argparse
import signal
import sys

from lfdm.config import ParamsError, load_params
from lfdm.errors import UserError
from stages import STAGES, execute


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the stage's MLflow run ends KILLED, not RUNNING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages", description=__doc__)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminated)
    try:
        execute(args.stage, params)
    except KeyboardInterrupt:
        print(f"error: {args.stage} interrupted", file=sys.stderr)
        return 130
    except UserError as err:  # bad params, data or inputs, a diverged run, a required store that failed
        print(f"error: {args.stage}: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
