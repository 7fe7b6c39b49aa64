"""The pipeline stages. Each ``stages/<name>.py`` has ``run(params) -> metrics``; ``execute`` wraps
it with the MLflow child run and the metrics file, and is what both DVC (``python -m stages <name>``)
and the Prefect flow call, so no stage logic exists twice."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from lfdm.config import Params

# stage → the params.yaml sections it reads (dvc.yaml's `params:` lists the same; a test checks it)
STAGES: dict[str, tuple[str, ...]] = {
    "preprocess": ("seed", "data"),
    "train_lfae": ("seed", "device", "precision", "data", "lfae", "train_lfae"),
    "finetune_decoder": ("seed", "device", "precision", "data", "train_lfae.perceptual", "finetune_decoder"),
    "extract_flow": ("device", "data.num_frames", "extract_flow"),
    "embed_labels": ("device", "text", "sample.extra_labels"),
    "train_dm": ("seed", "device", "precision", "dm", "train_dm"),
    "sample": ("device", "text", "sample"),
    "evaluate": ("seed", "device", "sample.fps", "evaluate"),
}


def execute(name: str, params: Params) -> dict[str, float]:
    """Run one stage with tracking, write ``<paths.metrics>/<name>.json``, return its metrics."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    run = importlib.import_module(f"stages.{name}").run
    if params.tracking.enabled:
        import mlflow

        from lfdm import tracking

        tracking.configure(params.tracking.uri, params.tracking.experiment)
        tree = params.model_dump(mode="json")
        section = {key: _lookup(tree, key) for key in STAGES[name]}
        with tracking.stage_run(name, tree, section):
            metrics = run(params)
            mlflow.log_metrics(metrics)
    else:
        metrics = run(params)
    out = Path(params.paths.metrics) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree
