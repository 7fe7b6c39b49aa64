"""Wall time of the whole pipeline and of each stage, and the share spent outside the stage functions.

    python benchmarks/pipeline.py                   # times `lfdm repro -f` (every stage, DVC route)
    python benchmarks/pipeline.py --route prefect   # times the Prefect flow in process (force=True)
    python benchmarks/pipeline.py --analyse-only    # only reads the newest pipeline run in MLflow

Each MLflow child run wraps exactly one stage function (``stages.execute``), so its duration is the
time spent in the stage's own work; everything else between the pipeline's start and end — process
start-up and imports, DVC hashing and lock files, Prefect scheduling, MLflow run bookkeeping — is
overhead. Uses the params' tracking store (default sqlite:///mlflow.db). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

from mlflow import MlflowClient

from lfdm import tracking
from lfdm.config import load_params


def run_route(route: str) -> float:
    command = {
        "dvc": ["lfdm", "repro", "-f"],
        "prefect": [sys.executable, "-c", "from flows.lfdm_flow import lfdm; lfdm(force=True)"],
    }[route]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return time.perf_counter() - start


def analyse(experiment: str, wall: float | None) -> None:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs(
        [exp.experiment_id], "tags.`lfdm.kind` = 'pipeline'", order_by=["start_time DESC"]
    )
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    children.sort(key=lambda r: r.info.start_time)
    pipeline_s = wall or (parent.info.end_time - parent.info.start_time) / 1000
    print(
        f"pipeline run {parent.info.run_name!r} ({parent.info.run_id}), {platform.machine()}, {os.cpu_count()} cores"
    )
    print("| stage | wall s (since previous stage ended) | stage function s | outside the function s |")
    print("|---|---|---|---|")
    previous_end, inside_total = parent.info.start_time, 0.0
    for child in children:
        inside = (child.info.end_time - child.info.start_time) / 1000
        wall_s = (child.info.end_time - previous_end) / 1000
        print(f"| {child.info.run_name} | {wall_s:.1f} | {inside:.1f} | {wall_s - inside:.1f} |")
        previous_end, inside_total = child.info.end_time, inside_total + inside
    outside = pipeline_s - inside_total
    print(
        f"| **total** | {pipeline_s:.1f} | {inside_total:.1f} | {outside:.1f} ({100 * outside / pipeline_s:.0f}%) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--route", choices=["dvc", "prefect"], default="dvc")
    parser.add_argument("--analyse-only", action="store_true")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    tracking.configure(p.tracking.uri, p.tracking.experiment)
    wall = None if args.analyse_only else run_route(args.route)
    analyse(p.tracking.experiment, wall)


if __name__ == "__main__":
    main()
