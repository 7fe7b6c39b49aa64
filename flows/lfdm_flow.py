"""The Prefect flow ``lfdm``: the DVC pipeline's stages as Prefect tasks, under one MLflow parent run.

Each task calls ``stages.execute(name, params)`` — the very function ``dvc repro`` runs — in process.
DVC stays the source of truth: the stage graph comes from dvc.yaml, a stage whose deps, params and outs
are unchanged is skipped (``dvc status``), and a stage that ran is recorded in dvc.lock (``dvc commit``),
so ``dvc repro`` after a Prefect run has nothing to do. Independent stages (``embed_labels`` beside
``train_lfae`` → ``extract_flow``, ``evaluate_references`` beside ``train_dm`` → ``sample``) run concurrently,
as threads of this process. With ``parallel.dask`` the clip-by-clip stages run
their shards on a Dask cluster (:mod:`flows.dask_shards`, whose prefect-dask is the ``dask`` extra).

One run at a time per working tree: a second run (from another deployment, worker or server) finds the
tree locked and ends at once, doing nothing. ``set_params`` (dotted keys, as ``dvc exp run -S`` takes them)
is written into params.yaml before the run, so DVC records what ran; when ``evaluate`` ran, its table and
the MLflow run become the markdown artifact ``lfdm-evaluation``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.futures import PrefectFuture

from flows import dvc_state
from lfdm.config import Params, apply_dotted, load_params
from lfdm.errors import UserError
from stages import SHARDED, STAGES, execute

LOCK = ".dvc/tmp/lfdm-flow.lock"  # under the working tree's .dvc/tmp, beside DVC's own lock
ARTIFACT = "lfdm-evaluation"


class _ToRunLogger(logging.Handler):
    """lfdm's log records (training progress, each stage's result) into the Prefect run they happen in: its
    log in the UI and the worker's console. Records from outside a run (a Dask shard) are dropped."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = get_run_logger()
        except MissingContextError:
            return
        logger.log(record.levelno, record.getMessage())


@contextmanager
def stage_logs_to_prefect() -> Iterator[None]:
    """The ``lfdm`` logger at INFO into :class:`_ToRunLogger` for the block, not also to the root's handlers
    (Prefect's console would print each line twice); as it was afterwards."""
    logger, handler = logging.getLogger("lfdm"), _ToRunLogger()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class WorkingTreeBusy(UserError):
    """Another flow run holds this working tree."""


@contextmanager
def working_tree_lock(project: Path) -> Iterator[None]:
    """Hold :data:`LOCK` of ``project`` for the block, or raise :class:`WorkingTreeBusy` naming its holder.
    A flock: the system drops it when its process dies, so a killed run leaves nothing to clean."""
    path = project / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise WorkingTreeBusy(
                f"{project.resolve()}: another lfdm flow run ({holder}) is running in this working tree; "
                "this run did nothing"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def run_stage(name: str, params_path: str, force: bool) -> dict[str, float]:
    """One DVC stage; a retry resumes training stages from their last checkpoint."""
    params = load_params(params_path)
    metrics_file = Path(params.paths.metrics) / f"{name}.json"
    if not force and metrics_file.is_file() and dvc_state.is_up_to_date(name):
        print(f"{name}: up to date (dvc status), skipped")
        return json.loads(metrics_file.read_text())
    map_shards = (
        dask_shards().dask_map_shards(params.parallel, name)
        if params.parallel.dask and name in SHARDED
        else None
    )
    try:
        metrics = execute(name, params, map_shards)
    except Exception as err:
        raise RuntimeError(f"stage {name!r} failed: {type(err).__name__}: {err}") from err
    dvc_state.record(name)
    if name == "evaluate":
        _publish_evaluation(params)
    return metrics


def dask_shards():
    """:mod:`flows.dask_shards`, or an error naming the extra that brings its prefect-dask."""
    try:
        from flows import dask_shards
    except ModuleNotFoundError as err:
        raise UserError(
            f"parallel.dask: true needs prefect-dask ({err}): install the dask extra, "
            "pip install -e '.[dask]', or set parallel.dask: false"
        ) from err
    return dask_shards


def _publish_evaluation(params: Params) -> None:
    """evaluate's table and the pipeline's MLflow run as the markdown artifact :data:`ARTIFACT`."""
    from lfdm import tracking

    parent = os.environ.get(tracking.PARENT_ENV)
    run = tracking.run_link(parent) if params.tracking.enabled and parent else "not tracked"
    table = (Path(params.paths.metrics) / "evaluate_table.md").read_text()
    create_markdown_artifact(
        markdown=f"{table}\n\nMLflow: {run}\n", key=ARTIFACT, description="the pipeline's evaluation table"
    )


@flow(name="lfdm", log_prints=True)
def lfdm(
    params_path: str = "params.yaml",
    project_dir: str = ".",
    force: bool = False,
    set_params: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Run the whole pipeline: ``force`` re-runs stages that DVC considers up to date; ``set_params``
    (``{"train_dm.lr": 1e-4}``) changes params.yaml first."""
    os.chdir(project_dir)
    with working_tree_lock(Path.cwd()), stage_logs_to_prefect():
        if set_params:
            print(f"{params_path}: set {', '.join(apply_dotted(set_params, params_path)) or 'nothing new'}")
        return _run_pipeline(params_path, force)


def _run_pipeline(params_path: str, force: bool) -> dict[str, dict[str, float]]:
    params = load_params(params_path)
    if params.parallel.dask:
        dask_shards()  # before any stage runs
    graph = dvc_state.stage_graph()
    unknown = set(graph.nodes) - set(STAGES)
    if unknown:
        raise ValueError(f"dvc.yaml has stages the flow does not know: {sorted(unknown)}")

    def submit_all() -> dict[str, dict[str, float]]:
        futures: dict[str, PrefectFuture] = {}
        for name in reversed(list(nx.topological_sort(graph))):  # upstream first
            upstream = [futures[dep] for dep in graph.successors(name)]
            futures[name] = run_stage.with_options(name=name, task_run_name=name).submit(
                # Prefect's overloads take wait_for only beside an explicit return_state
                name,
                params_path,
                force,
                wait_for=upstream,
                return_state=False,
            )
        return {name: future.result() for name, future in futures.items()}

    if not params.tracking.enabled:
        return submit_all()
    from lfdm import tracking

    tracking.configure(params.tracking.uri, params.tracking.experiment, params.tracking.required)
    with tracking.pipeline_run(params.model_dump(mode="json"), run_name="prefect lfdm"):
        return submit_all()
