"""Paper Table 6 on this pipeline: each sampler setting is a DVC experiment (`dvc exp run -S ...`), which
re-runs only `sample` and `evaluate`; prints LFDM's FVD, condition accuracy, fid_i3d, flow cosine and seconds
per video for each, as a markdown table.

    python benchmarks/samplers.py                                   # every row of ROWS
    python benchmarks/samplers.py --rows ddim-10 dpmsolver++-20     # some of them
    python benchmarks/samplers.py --set sample.seen_videos=0        # extra -S for every row

Afterwards params.yaml, dvc.lock, the metrics and the outputs are back as they were; `dvc exp show` lists the
experiments and `dvc exp apply <name>` brings one into the workspace.
Commit nothing while it runs: each `dvc exp run` sets the branch back to the commit it started from when it
ends, so a commit made meanwhile leaves the branch (`git reflog` still has it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from lfdm.config import load_params


def row(
    sampler: str, steps: int, guidance: float = 1.0, eta: float = 0.0, spacing: str = "leading"
) -> dict[str, object]:
    """One row's `sample` settings; every row sets all five, so no row inherits another's."""
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "eta": eta, "timestep_spacing": spacing}


ROWS: dict[str, dict[str, object]] = {
    "ddpm-1000": row("ddpm", 1000),
    "ddim-10": row("ddim", 10),
    "ddim-25": row("ddim", 25),
    "ddim-100": row("ddim", 100),
    "ddim-20-eta1": row("ddim", 20, eta=1.0),
    "ddim-20-eta1-trailing": row("ddim", 20, eta=1.0, spacing="trailing"),
    "dpmsolver++-10": row("dpmsolver++", 10),
    "dpmsolver++-20": row("dpmsolver++", 20),
    "sde-dpmsolver++-10": row("sde-dpmsolver++", 10),
    "sde-dpmsolver++-20": row("sde-dpmsolver++", 20),
    "ddim-25-g1.1": row("ddim", 25, guidance=1.1),
    "ddim-25-g5": row("ddim", 25, guidance=5.0),
    "ddim-25-stochastic": row("ddim", 25, guidance=0.0),
}


def rewritten_files(metrics_dir: Path, plots_dir: Path) -> list[Path]:
    """What `dvc exp run` rewrites in the workspace and `dvc checkout` does not bring back: params, the lock
    file and the uncached outputs of `sample` and `evaluate`, and of `train_dm` for a `--set train_dm.*`."""
    return [
        Path("params.yaml"),
        Path("dvc.lock"),
        metrics_dir / "train_dm.json",
        plots_dir / "train_dm.tsv",
        metrics_dir / "sample.json",
        metrics_dir / "evaluate.json",
        metrics_dir / "headline.json",
        metrics_dir / "evaluate_table.md",
        plots_dir / "evaluate_l1_per_frame.json",
        plots_dir / "real_vs_generated.gif",
    ]


def run_row(name: str, settings: dict[str, object], extra: list[str], metrics_dir: Path) -> dict[str, float]:
    overrides = [f"sample.{key}={value}" for key, value in settings.items()] + extra
    command = ["dvc", "exp", "run", "-n", f"{name}-{time.strftime('%m%d-%H%M%S')}"]
    for override in overrides:
        command += ["-S", override]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    evaluated = json.loads((metrics_dir / "evaluate.json").read_text())
    sampled = json.loads((metrics_dir / "sample.json").read_text())
    return {
        "fvd": evaluated["fvd/lfdm"],
        "accuracy": evaluated["accuracy/lfdm"],
        "fid_i3d": evaluated["fid_i3d/lfdm"],
        "flow_cosine": evaluated["flow_cosine"],
        "fvd_static": evaluated["fvd/static"],
        "fvd_oracle": evaluated["fvd/oracle"],
        "seconds_per_video": sampled["seconds_per_video"],
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra -S for every row")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    paths = load_params("params.yaml").paths
    metrics_dir = Path(paths.metrics)
    kept = {
        path: path.read_bytes() for path in rewritten_files(metrics_dir, Path(paths.plots)) if path.is_file()
    }
    results: dict[str, dict[str, float]] = {}
    try:
        for name in args.rows:
            results[name] = run_row(name, ROWS[name], args.set, metrics_dir)
            print(json.dumps({name: results[name]}), flush=True)
    finally:
        for path, content in kept.items():
            path.write_bytes(content)
        subprocess.run(["dvc", "checkout", "--quiet"], check=False)
    print(
        "| sampler | FVD ↓ | accuracy ↑ | fid_i3d ↓ | flow cosine ↑ | s / video | FVD / static | FVD / oracle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['fvd']:.1f} | {r['accuracy']:.3f} | {r['fid_i3d']:.3f} | {r['flow_cosine']:.3f} "
            f"| {r['seconds_per_video']:.2f} "
            f"| {r['fvd'] / r['fvd_static']:.2f} | {r['fvd'] / r['fvd_oracle']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
