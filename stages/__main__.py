"""``python -m stages <name> [--params params.yaml]`` — the command every dvc.yaml stage runs."""

from __future__ import annotations

import argparse
import sys

from lfdm.config import ParamsError, load_params
from stages import STAGES, execute


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
    execute(args.stage, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
