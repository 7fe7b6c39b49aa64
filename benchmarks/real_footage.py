"""The pipeline on real footage with the default params: `lfdm footage` clips as a `folder` dataset.

Writes the clips and a project (params.yaml = this repository's, with data.dataset: folder) under --out,
runs the stages in order as `python -m stages <name>` would, and prints each stage's wall time and the
figures docs/results.md quotes: the teacher's and F's share of the static L1 left (pretrain_flow), the
LFAE oracle against the static baseline (evaluate_references) and LFDM's row (evaluate).

    python benchmarks/real_footage.py --out /tmp/footage-run                 # 39 clips, every stage
    python benchmarks/real_footage.py --out /tmp/footage-100 --stride 3 --until pretrain_flow   # 112 clips

A benchmark, not a test: it takes tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lfdm.data.footage import write_footage
from stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "pretrain_flow": (
        "warp_l1_ratio/teacher",
        "warp_l1_ratio/flow_predictor",
        "mask_share/background",
        "mask_share/regions",
        "mask_share/local",
    ),
    "evaluate_references": (
        "l1/static",
        "l1/oracle",
        "fvd/static",
        "fvd/oracle",
        "accuracy/real",
        "accuracy/oracle",
    ),
    "evaluate": ("l1/lfdm", "fvd/lfdm", "accuracy/lfdm"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="a new directory for the clips and the project"
    )
    parser.add_argument(
        "--stride", type=int, default=12, help="frames between training clips (3: 104 of them)"
    )
    parser.add_argument("--until", choices=list(STAGES), default="evaluate", help="the last stage to run")
    args = parser.parse_args()

    footage = args.out / "footage"
    write_footage(footage, stride=args.stride)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] |= {"dataset": "folder", "root": str(footage)}
    params["tracking"]["enabled"] = False
    (args.out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = os.environ | {"PYTHONPATH": str(ROOT)}

    stages = list(STAGES)[: list(STAGES).index(args.until) + 1]
    rows = []
    for name in stages:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages", name], cwd=args.out, env=env, check=True)
        rows.append((name, time.perf_counter() - start))
    print(
        "| stage | wall s |\n|---|---|\n" + "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in rows)
    )
    for name, keys in FIGURES.items():
        if name in stages:
            metrics = json.loads((args.out / "metrics" / f"{name}.json").read_text())
            print(f"{name}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics))
    if "evaluate_references" in stages:
        refs = json.loads((args.out / "metrics/evaluate_references.json").read_text())
        print(
            f"oracle / static: L1 {refs['l1/oracle'] / refs['l1/static']:.3f}, "
            f"FVD {refs['fvd/oracle'] / refs['fvd/static']:.3f}"
        )


if __name__ == "__main__":
    main()
