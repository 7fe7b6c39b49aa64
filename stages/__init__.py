"""The pipeline stages. Each ``stages/<name>.py`` has ``run(params) -> metrics``; ``execute`` wraps
it with the MLflow child run and the metrics file, and is what both DVC (``python -m stages <name>``)
and the Prefect flow call, so no stage logic exists twice."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lfdm import distributed
from lfdm.config import Params
from lfdm.shards import MapShards

log = logging.getLogger("lfdm.stages")  # one line per finished stage for an orchestrator's log

# the stage's MLflow run, opened by the process that launched torchrun, for rank 0 to log into
RUN_ENV = "LFDM_MLFLOW_RUN_ID"

# stage → the params.yaml sections it reads (dvc.yaml's `params:` lists the same; a test checks it)
STAGES: dict[str, tuple[str, ...]] = {
    "preprocess": ("seed", "data"),
    "pretrain_flow": ("seed", "device", "data", "lfae", "pretrain_flow"),
    "train_lfae": ("seed", "device", "precision", "data", "lfae", "train_lfae"),
    "finetune_decoder": ("seed", "device", "precision", "data", "train_lfae.perceptual", "finetune_decoder"),
    "extract_flow": ("seed", "device", "precision", "data.num_frames", "data.frame_sampling", "extract_flow"),
    "embed_labels": ("device", "text", "sample.extra_labels"),
    "train_dm": ("seed", "device", "precision", "dm", "train_dm"),
    "sample": ("device", "precision", "text", "sample"),
    "evaluate_references": ("seed", "device", "evaluate"),
    "evaluate": ("device", "sample.fps", "evaluate"),
}
# stages whose runs carry the machine's system metrics (MLflow's monitor) while they train
TRAINING = ("pretrain_flow", "train_lfae", "finetune_decoder", "train_dm")
# evaluate's metrics that the pipeline's MLflow parent run carries and `dvc exp show` lists (with the ratios of
# _headline, in <paths.metrics>/headline.json): DVC's metrics are these and the training losses, nothing else
HEADLINE = ("fvd/lfdm", "fvd/oracle", "fvd/static", "accuracy/lfdm", "accuracy/real", "l1/lfdm")
# stages that work clip by clip: ``run(params, shards, map_shards)`` splits them (lfdm.shards)
SHARDED = ("extract_flow", "sample", "evaluate_references", "evaluate")
# the Prefect flow runs independent stages in threads of one process, and diffusers' and transformers' lazy
# modules are not safe to import from two threads at once ("cannot import name 'DDIMScheduler'")
_IMPORT_LOCK = threading.Lock()


def execute(name: str, params: Params, map_shards: MapShards | None = None) -> dict[str, float]:
    """Run one stage with tracking, write ``<paths.metrics>/<name>.json``, return its metrics.

    ``map_shards`` (the Prefect flow's Dask runner) runs a :data:`SHARDED` stage's
    ``parallel.shards`` shards; without it the stage runs as one piece in this process.

    A training stage whose ``nproc`` is above 1 re-runs itself under torchrun (unless it already runs
    under it): this process opens the MLflow run, rank 0 logs into it and writes the metrics file."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    out = Path(params.paths.metrics) / f"{name}.json"
    nproc = getattr(getattr(params, name, None), "nproc", 1)  # only training stages have one
    if nproc > 1 and not distributed.under_torchrun():
        with _tracked(name, params) as run_id:
            distributed.launch(name, params, nproc, env={RUN_ENV: run_id} if run_id else None)
        return json.loads(out.read_text())
    run = stage_function(name)
    if map_shards is not None and name in SHARDED:
        run = functools.partial(run, shards=params.parallel.shards, map_shards=map_shards)
    start = time.perf_counter()
    with _tracked(name, params) as run_id:
        metrics = run(params)
        headline = _headline(name, metrics)
        if distributed.is_main():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            if headline:  # evaluate's: the file dvc.yaml declares as its metrics
                out.with_name("headline.json").write_text(
                    json.dumps(headline, indent=2, sort_keys=True) + "\n"
                )
        if run_id:
            from lfdm import tracking

            tracking.log_results(metrics, headline)
            tracking.log_lineage(name)  # every output written, the metrics file included
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    log.info("%s: done in %.1f s (%s)", name, time.perf_counter() - start, summary)
    return metrics


def stage_function(name: str):
    """``stages/<name>.py: run``, imported under a lock (safe from any thread)."""
    with _IMPORT_LOCK:
        return importlib.import_module(f"stages.{name}").run


@contextlib.contextmanager
def _tracked(name: str, params: Params) -> Iterator[str | None]:
    """The stage's MLflow child run, yielding its id; rank 0 under ``launch`` joins the launcher's run.
    Nothing (None) when tracking is off or down, for a disabled stage, and on ranks other than 0."""
    disabled = not getattr(getattr(params, name, None), "enabled", True)  # finetune_decoder.enabled
    if not params.tracking.enabled or disabled or not distributed.is_main():
        yield None
        return
    from lfdm import tracking

    settings = params.tracking
    if not tracking.configure(settings.uri, settings.experiment, settings.required):
        yield None
    elif run_id := os.environ.get(RUN_ENV):
        with tracking.logging_into(run_id):
            yield run_id
    else:
        tree = params.model_dump(mode="json")
        section = {key: _lookup(tree, key) for key in STAGES[name]}
        with (
            tracking.stage_run(name, tree, section) as run_id,
            tracking.system_metrics(run_id if name in TRAINING else None),
        ):
            yield run_id


def _headline(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """:data:`HEADLINE` of evaluate's metrics, and LFDM's and the oracle's FVD and L1 over the static
    baseline's (below 1: better than a frozen first frame); nothing for other stages."""
    if name != "evaluate":
        return {}
    out = {key: metrics[key] for key in HEADLINE if key in metrics}
    for score in ("fvd", "l1"):
        for method in ("lfdm", "oracle"):
            if metrics.get(f"{score}/static") and f"{score}/{method}" in metrics:
                out[f"{score}_vs_static/{method}"] = metrics[f"{score}/{method}"] / metrics[f"{score}/static"]
    return out


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree
