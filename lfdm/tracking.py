"""MLflow tracking: one parent run per pipeline run, one child run per stage.

The parent run id travels in ``LFDM_MLFLOW_PARENT_RUN_ID``: the Prefect flow (and ``lfdm repro``) open
the parent and export it. A bare ``dvc repro`` has no such wrapper, so each stage finds the parent of its
own ``dvc`` process through a marker file (``.lfdm/mlflow-parent.json``, keyed by that process's pid and
start time): all stages of one ``dvc repro`` share one parent, the next ``dvc repro`` gets a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psutil

PARENT_ENV = "LFDM_MLFLOW_PARENT_RUN_ID"
MARKER = Path(".lfdm/mlflow-parent.json")

# Telemetry off unless the user opted in explicitly (MLflow reads the string "true", not "1").
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def configure(tracking_uri: str | None, experiment: str) -> None:
    """Tracking URI: ``MLFLOW_TRACKING_URI`` wins, then params, then a local SQLite file under the repo."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or "sqlite:///mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"dm": {"unet": {"dim": 32}}}`` → ``{"dm.unet.dim": 32}`` for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def start_parent(params: Mapping[str, Any], run_name: str = "pipeline") -> str:
    """Create the parent run, log the whole params tree on it, and return its id (left RUNNING)."""
    tags = {"lfdm.kind": "pipeline"}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten(params))
    mlflow.MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def _dvc_ancestor() -> psutil.Process | None:
    proc = psutil.Process().parent()
    while proc is not None:
        with contextlib.suppress(psutil.Error):
            if any(Path(arg).name == "dvc" or arg.endswith("/dvc") for arg in proc.cmdline()[:2]):
                return proc
        proc = proc.parent()
    return None


def _parent_for_this_dvc_run(params: Mapping[str, Any]) -> str:
    dvc = _dvc_ancestor()
    key = {"pid": dvc.pid, "started": dvc.create_time()} if dvc else None
    if key and MARKER.is_file():
        marker = json.loads(MARKER.read_text())
        if marker.get("key") == key and marker.get("uri") == mlflow.get_tracking_uri():
            return marker["run_id"]
    run_id = start_parent(params, run_name="dvc repro" if dvc else "stage")
    if key:
        MARKER.parent.mkdir(exist_ok=True)
        MARKER.write_text(json.dumps({"key": key, "uri": mlflow.get_tracking_uri(), "run_id": run_id}))
    return run_id


@contextlib.contextmanager
def pipeline_run(params: Mapping[str, Any], run_name: str = "pipeline") -> Iterator[str]:
    """Open a parent run for a whole pipeline and export its id to every stage (in or out of process)."""
    run_id = start_parent(params, run_name)
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        mlflow.MlflowClient().set_terminated(run_id, status)
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], section: Mapping[str, Any]) -> Iterator[str]:
    """A child run named after the stage, with the stage's own params section logged on it.

    Under a bare ``dvc repro`` nobody else closes the parent, so each stage leaves it FINISHED (or
    FAILED) when it ends: the parent's status is that of the latest stage.
    """
    owned_parent = PARENT_ENV not in os.environ
    parent = os.environ.get(PARENT_ENV) or _parent_for_this_dvc_run(params)
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=stage, parent_run_id=parent, tags={"lfdm.stage": stage}) as run:
            mlflow.log_params(flatten(section, f"{stage}."))
            yield run.info.run_id
        status = "FINISHED"
    finally:
        if owned_parent:
            mlflow.MlflowClient().set_terminated(parent, status)


# The helpers below are no-ops without an active run, so library code may call them unconditionally
# (tracking disabled, unit tests, a notebook).


def log_metrics(values: Mapping[str, float], step: int | None = None) -> None:
    if mlflow.active_run():
        mlflow.log_metrics(dict(values), step=step)


def log_image(image: np.ndarray, artifact_file: str) -> None:
    """An ``(H, W, 3)`` uint8 picture as a PNG artifact."""
    if mlflow.active_run():
        mlflow.log_image(image, artifact_file)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    if mlflow.active_run():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
