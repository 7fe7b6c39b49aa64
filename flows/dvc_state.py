"""What the Prefect flow asks DVC: the stage graph, whether a stage is up to date, and recording a stage
it ran in dvc.lock. Kept apart from the flow module so the lock pickles by reference when Prefect
ships the flow function to a subprocess."""

from __future__ import annotations

import threading

import networkx as nx
from dvc.repo import Repo

_lock = threading.Lock()  # DVC's repo lock is per process; concurrent tasks take turns


def stage_graph() -> nx.DiGraph:
    """Stage name → the stages it reads from, as declared in dvc.yaml (edges point upstream)."""
    with _lock, Repo(".") as repo:
        graph = repo.index.graph
        return nx.relabel_nodes(graph, {stage: stage.addressing for stage in graph.nodes})


def is_up_to_date(stage: str) -> bool:
    with _lock, Repo(".") as repo:
        return not repo.status(targets=[stage])


def record(stage: str) -> None:
    """``dvc commit``: store the stage's current deps, params and outs in dvc.lock and the cache."""
    with _lock, Repo(".") as repo:
        repo.commit(stage, force=True)
