"""Shards for the stages that work clip by clip (``extract_flow``, ``sample``, ``evaluate_references``,
``evaluate``: :data:`stages.SHARDED`).

Such a stage splits its work into shards of whole batches, runs one function per shard and merges what
the shards return. A :data:`MapShards` decides where the shards run: :func:`serial` runs them in order
in this process (``dvc repro``); the Prefect flow passes one that runs them as tasks on a Dask cluster
(:mod:`flows.dask_shards`). A shard function must be picklable (a module-level function, or a
``functools.partial`` of one) and must not rely on state of the calling process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

S = TypeVar("S")
R = TypeVar("R")

MapShards = Callable[[Callable[[S], R], Sequence[S]], list[R]]


def serial(fn: Callable[[S], R], shards: Sequence[S]) -> list[R]:
    return [fn(shard) for shard in shards]


def batch_shards(items: Sequence[S], batch_size: int, shards: int) -> list[list[tuple[int, Sequence[S]]]]:
    """``items`` in batches of ``batch_size``, numbered, dealt into at most ``shards`` contiguous shards.

    Every shard holds whole batches ``(batch index, items)``, so a batch is the same however the work is
    sharded, and a stage that seeds each batch by its index gives the same output for any shard count."""
    batches = [
        (i, items[start : start + batch_size]) for i, start in enumerate(range(0, len(items), batch_size))
    ]
    per_shard = -(-len(batches) // max(1, shards)) if batches else 1
    return [batches[start : start + per_shard] for start in range(0, len(batches), per_shard)]
