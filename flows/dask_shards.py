"""A stage's clip shards as Prefect tasks on a Dask cluster (prefect-dask's ``DaskTaskRunner``).

With ``parallel.dask: true`` the flow hands :func:`dask_map_shards` to the clip-by-clip stages
(:data:`stages.SHARDED`); each then runs its shards as a sub-flow ``<stage>-shards`` whose tasks go to the cluster at
``parallel.address``, or to a local cluster of ``parallel.workers`` processes started for the stage.
The stage itself (its MLflow run, the merge of the shard results, the metrics file) stays in the flow's
process, so the shards only read inputs and write their own clips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from prefect_dask.task_runners import DaskTaskRunner

from lfdm.config import ParallelConfig
from lfdm.shards import MapShards


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def run_shard(fn: Callable[[Any], Any], shard: Any) -> Any:
    """One shard; a retry redoes it whole (a shard only overwrites its own clips)."""
    return fn(shard)


def task_runner(cfg: ParallelConfig) -> DaskTaskRunner:
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    threads = str(cfg.threads_per_worker)  # torch's thread pool follows OMP_NUM_THREADS
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        }
    )


def dask_map_shards(cfg: ParallelConfig, stage: str) -> MapShards:
    def map_shards(fn: Callable[[Any], Any], shards: Sequence[Any]) -> list[Any]:
        # flow() asks for TaskRunner[PrefectFuture], invariant in the future type, which only the base
        # class meets (Prefect casts its own default runner the same way)
        @flow(name=f"{stage}-shards", task_runner=cast(TaskRunner[PrefectFuture[Any]], task_runner(cfg)))
        def stage_shards() -> list[Any]:
            futures = run_shard.map(unmapped(fn), shards)
            return [future.result() for future in futures]

        return stage_shards()

    return map_shards
