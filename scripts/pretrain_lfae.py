"""Pretrain the LFAE that the default pipeline starts from (``train_lfae.init``).

The official code starts stage one from pretrained MRAA weights; a motion estimator does not emerge from
scratch in the few hundred steps a 2-core CPU affords inside ``dvc repro`` (docs/model.md). This script
trains the default ``lfae`` network on the default dataset for longer, with the pipeline's own stages
(``preprocess`` + ``train_lfae`` with ``init: null`` and ``--steps``), in a scratch directory, and writes
the checkpoint that ``params.yaml: train_lfae.init`` points to:

    OMP_NUM_THREADS=2 python scripts/pretrain_lfae.py --steps 2000 --out assets/lfae-embedded-64.pt

Measured: 2000 steps, 1.3 s/step with one thread beside other work on the 2-core CPU (docs/model.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import yaml

from lfdm.config import parse_params
from stages import execute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the pipeline params to pretrain for")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="assets/lfae-embedded-64.pt")
    args = parser.parse_args()

    raw = yaml.safe_load(Path(args.params).read_text())
    with tempfile.TemporaryDirectory(prefix="lfdm-pretrain-") as work:
        raw["paths"] = {key: f"{work}/{value}" for key, value in raw["paths"].items()}
        raw["tracking"]["enabled"] = False
        raw["train_lfae"] |= {"init": None, "steps": args.steps, "checkpoint_every": 250}
        p = parse_params(raw, args.params)
        execute("preprocess", p)
        print(execute("train_lfae", p))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p.paths.lfae, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
