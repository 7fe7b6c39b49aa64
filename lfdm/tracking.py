"""MLflow tracking: one parent run per pipeline run, one child run per stage, best effort.

The parent run id travels in ``LFDM_MLFLOW_PARENT_RUN_ID``: the Prefect flow (and ``lfdm repro``) open
the parent and export it. A bare ``dvc repro`` has no such wrapper, so each stage finds the parent of its
own ``dvc`` process through a marker file (``.lfdm/mlflow-parent.json``, keyed by that process's pid and
start time): all stages of one ``dvc repro`` share one parent, the next ``dvc repro`` gets a new one.

Tracking never costs work. The store gets :data:`CONNECT_TIMEOUT` seconds to answer before a run opens,
and a store that does not answer, or that fails mid-run, costs one warning: the stage goes on untracked
(``tracking.required: true`` makes either an error naming the URI). Runs end FINISHED, FAILED or KILLED
(Ctrl-C, SIGTERM); a run left RUNNING by a process that no longer exists (``kill -9``, a power cut) is
marked KILLED by the next stage on the same host.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import numpy as np
import psutil
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from tqdm import tqdm

from lfdm.errors import UserError

T = TypeVar("T")
PARENT_ENV = "LFDM_MLFLOW_PARENT_RUN_ID"
MARKER = Path(".lfdm/mlflow-parent.json")
CODE_DIRS = ("lfdm/", "stages/")  # a stage's deps there are code; the rest are data (dataset inputs)
CONNECT_TIMEOUT = 3.0  # seconds an HTTP store has to answer before the stage goes on untracked

# Telemetry off unless the user opted in explicitly (MLflow reads the string "true", not "1").
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's HTTP client retries a call 7 times with exponential backoff and waits 120 s for each answer:
# minutes per call against a dead server. Two retries and 10 s bound a failure mid-run to seconds once,
# after which the stage stops tracking. Explicit settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class TrackingError(UserError, RuntimeError):
    """The tracking store failed and ``tracking.required`` is true."""


class _Store(NamedTuple):
    client: MlflowClient
    experiment_id: str


_required = False  # tracking.required of the latest configure()
_down = False  # the store failed in this process since the latest configure(): tracking is off
_uri: str | None = None  # the store of the latest configure()
_opened: _Store | None = None  # the latest store a configure() reached
_local = threading.local()  # .run_id: the run this thread logs into (the Prefect flow runs stages in threads)


def repo_root() -> Path:
    """The DVC repository's root. DVC sets ``DVC_ROOT`` for every stage, and for ``dvc exp run --temp``
    and ``--queue`` points it at the original repository, not the temporary copy the stage runs in.
    Elsewhere the nearest directory above the working one with a ``.dvc`` folder (the repository that
    holds a copy under ``.dvc/tmp/exps/``), else the working directory."""
    if root := os.environ.get("DVC_ROOT"):
        return Path(root).resolve()
    cwd = Path.cwd().resolve()
    for path in (cwd, *cwd.parents):
        if path.parent.parts[-3:] == (".dvc", "tmp", "exps"):
            return path.parents[3]
        if (path / ".dvc").is_dir():
            return path
    return cwd


def resolve_uri(tracking_uri: str | None) -> str:
    """``MLFLOW_TRACKING_URI`` wins, then params, then ``mlflow.db`` at the repository root. A relative
    SQLite path is taken from the repository root, so a stage in a temporary workspace keeps its runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{repo_root() / uri.removeprefix('sqlite:///')}"
    return uri


def configure(tracking_uri: str | None, experiment: str, required: bool = False) -> bool:
    """Select the store and the experiment. False when the store does not answer (one warning; the caller
    goes on untracked), or :class:`TrackingError` when ``required``. The URI goes to an explicit client,
    not to ``mlflow.set_tracking_uri``, which would export it as ``MLFLOW_TRACKING_URI``: that variable
    is the user's, and it would override the params of every later configure() in this process."""
    global _required, _down, _uri, _opened
    _required, _down, _uri = required, False, resolve_uri(tracking_uri)
    opened = _call(_open, _uri, experiment)
    if opened is not None:  # else tracking is down, and no _call reaches a store
        _opened = opened
    return opened is not None


def _open(uri: str, experiment: str) -> _Store:
    _probe(uri)
    client = MlflowClient(uri)  # opens (or creates) a SQLite store: a corrupt file fails here
    experiment_id = _experiment(client, experiment, uri)
    _end_orphans(client, experiment_id)
    return _Store(client, experiment_id)


def _store() -> _Store:
    """The store every run lives in: a run id exists only after configure() reached one."""
    if _opened is None:
        raise RuntimeError("MLflow tracking is not configured (lfdm.tracking.configure reached no store)")
    return _opened


def _probe(uri: str) -> None:
    """Raise unless an HTTP store answers within :data:`CONNECT_TIMEOUT` (the wait includes name lookup,
    which no socket timeout bounds). Other stores are local files and fail fast on their own."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    answer: list[BaseException | None] = []

    def get() -> None:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT):
                answer.append(None)
        except urllib.error.HTTPError as err:  # it answered; a 5xx is a proxy whose server is down
            answer.append(err if err.code >= 500 else None)
        except (OSError, http.client.HTTPException) as err:
            answer.append(err)

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT)
    if not answer:
        raise TimeoutError(f"no answer within {CONNECT_TIMEOUT:g} s")
    if answer[0] is not None:
        raise answer[0]


def _experiment(client: MlflowClient, name: str, uri: str) -> str:
    if found := client.get_experiment_by_name(name):
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in a temporary working directory
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def _owner() -> dict[str, str]:
    """Tags naming this process, so that a later stage can tell whether the run's process still exists."""
    me = psutil.Process()
    return {"lfdm.host": socket.gethostname(), "lfdm.process": f"{me.pid}@{me.create_time()}"}


def _end_orphans(client: MlflowClient, experiment_id: str) -> None:
    """Mark KILLED this host's RUNNING runs whose process no longer exists."""
    running_here = f"attributes.status = 'RUNNING' and tags.`lfdm.host` = '{socket.gethostname()}'"
    for run in client.search_runs([experiment_id], running_here):
        pid, _, started = run.data.tags.get("lfdm.process", "").partition("@")
        try:
            alive = str(psutil.Process(int(pid)).create_time()) == started
        except (ValueError, psutil.Error):
            alive = False
        if not alive:
            client.set_terminated(run.info.run_id, "KILLED")


def _reason(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def _lost(err: BaseException) -> None:
    """The store failed: raise when tracking is required, else warn (once) and stop tracking."""
    global _down
    reason = _reason(err)
    message = f"MLflow tracking at {_uri} failed: {reason}"
    if _required:
        raise TrackingError(f"{message} (tracking.required is true)") from err
    if not _down:
        _down = True
        # tqdm.write: on a line of its own, not after a training stage's progress bar
        tqdm.write(
            f"warning: {message}; going on untracked (tracking.required: true makes this an error)",
            file=sys.stderr,
        )


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` unless tracking is down; a failure takes it down (see :func:`_lost`)."""
    if _down:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever the store or its client raises, the stage goes on
        _lost(err)
        return None


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


def _start(run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """A RUNNING run in the configured experiment, owned by this process, with ``params`` logged."""
    tags = resolve_tags({**_owner(), **tags})  # adds user and source, as mlflow.start_run does
    store = _store()
    run_id = store.client.create_run(store.experiment_id, tags=tags, run_name=run_name).info.run_id
    store.client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run_id


def start_parent(params: Mapping[str, Any], run_name: str = "pipeline") -> str:
    """Create the parent run, log the whole params tree on it, and return its id (left RUNNING). It is
    named after the DVC experiment (``dvc exp run``), else ``run_name`` and the commit."""
    tags = {"lfdm.kind": "pipeline"}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
        run_name = f"{run_name} {commit[:7]}"
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = run_name = exp
    return _start(run_name, tags, flatten(params))


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
        if marker.get("key") == key and marker.get("uri") == _uri:
            return marker["run_id"]
    run_id = start_parent(params, run_name="dvc repro" if dvc else "stage")
    if key:
        MARKER.parent.mkdir(exist_ok=True)
        MARKER.write_text(json.dumps({"key": key, "uri": _uri, "run_id": run_id}))
    return run_id


@contextlib.contextmanager
def logging_into(run_id: str | None, *ends: str | None) -> Iterator[None]:
    """This thread logs into ``run_id`` (rank 0 into the run its launcher opened); on the way out the
    runs ``ends`` end FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM (``SystemExit``)."""
    previous, _local.run_id = getattr(_local, "run_id", None), run_id
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        _local.run_id = previous
        for end in filter(None, ends):
            _call(_store().client.set_terminated, end, status)


@contextlib.contextmanager
def pipeline_run(params: Mapping[str, Any], run_name: str = "pipeline") -> Iterator[str | None]:
    """Open a parent run for a whole pipeline and export its id to every stage (in or out of process);
    None, and nothing exported, when tracking is down."""
    run_id = _call(start_parent, params, run_name)
    if run_id is None:
        yield None
        return
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    try:
        with logging_into(None, run_id):
            yield run_id
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous
        _call(_drop_if_empty, run_id)


def _drop_if_empty(run_id: str) -> None:
    """Delete a parent whose pipeline ran no stage (everything was up to date)."""
    children = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'"
    store = _store()
    if not store.client.search_runs([store.experiment_id], children, max_results=1):
        store.client.delete_run(run_id)


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], section: Mapping[str, Any]) -> Iterator[str | None]:
    """A child run named after the stage, with the stage's own params section logged on it; None when
    tracking is down.

    Under a bare ``dvc repro`` nobody else closes the parent, so each stage leaves it FINISHED (or
    FAILED, KILLED) when it ends: the parent's status is that of the latest stage.
    """
    owned_parent = PARENT_ENV not in os.environ
    parent = os.environ.get(PARENT_ENV) or _call(_parent_for_this_dvc_run, params)
    run_id = None
    if parent:
        tags = {"lfdm.stage": stage, MLFLOW_PARENT_RUN_ID: parent}
        run_id = _call(_start, stage, tags, flatten(section, f"{stage}."))
    with logging_into(run_id, run_id, parent if owned_parent else None):
        yield run_id


# The helpers below are no-ops without a run (tracking disabled or down, unit tests, a notebook), so library
# code may call them unconditionally.


def run_link(run_id: str) -> str:
    """Where to look at ``run_id``: its page on a tracking server, or the ``mlflow ui`` command that shows a
    local store (the page is then ``http://127.0.0.1:5000`` + the same path)."""
    path = f"#/experiments/{_store().experiment_id}/runs/{run_id}"
    if _uri and _uri.startswith(("http://", "https://")):
        return f"{_uri.rstrip('/')}/{path}"
    return f"run {run_id}: `mlflow ui --backend-store-uri {_uri}`, then {path}"


def active_run_id() -> str | None:
    """The run this thread logs into, None when there is none or the store is down."""
    return None if _down else getattr(_local, "run_id", None)


@contextlib.contextmanager
def fluent(what: str) -> Iterator[str | None]:
    """MLflow's fluent API (``mlflow.pyfunc.log_model``, ``mlflow.log_metrics``, ``MlflowClient()``) pointed at
    the configured store and this thread's run for the duration; yields the run's id, or None (and points
    nothing) without one. The fluent URI and ``MLFLOW_TRACKING_URI`` are restored afterwards. The URI is
    process-wide: this is for a stage's end, not for stages running side by side in threads.

    Best effort as the rest: a failure inside costs one warning naming ``what`` and the stage goes on
    (tracked), or it is a :class:`TrackingError` when ``tracking.required``."""
    run_id, uri = active_run_id(), _uri
    if run_id is None or uri is None:
        yield None
        return
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # restores the previous URI exactly

    env = os.environ.get("MLFLOW_TRACKING_URI")  # the user's; set_tracking_uri exports its URI there
    try:
        # leaving start_run marks the run FINISHED (FAILED); logging_into sets its status when the stage ends
        with _use_tracking_uri(uri), mlflow.start_run(run_id=run_id, nested=True):
            yield run_id
    except Exception as err:  # noqa: BLE001 - whatever the store or MLflow raises, the stage goes on
        message = f"{what} in MLflow at {uri} failed: {_reason(err)}"
        if _required:
            raise TrackingError(f"{message} (tracking.required is true)") from err
        tqdm.write(f"warning: {message}; the stage goes on", file=sys.stderr)
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _metrics(values: Mapping[str, float], step: int | None = None) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step or 0) for key, value in values.items()]


def log_metrics(values: Mapping[str, float], step: int | None = None) -> None:
    if run_id := active_run_id():
        _call(_store().client.log_batch, run_id, metrics=_metrics(values, step))


def log_results(values: Mapping[str, float], headline: Mapping[str, float] | None = None) -> None:
    """A stage's final results: whole numbers (steps, clip counts) as params of its run, as they are counts
    to filter by, not measurements to plot; the rest as metrics. ``headline`` also goes on the pipeline's
    parent run, so that pipeline runs compare at a glance."""
    if not (run_id := active_run_id()):
        return
    counts = [Param(key, str(value)) for key, value in values.items() if isinstance(value, int)]
    measured = {key: value for key, value in values.items() if not isinstance(value, int)}
    client = _store().client
    _call(client.log_batch, run_id, metrics=_metrics(measured), params=counts)
    if not headline:
        return
    run = _call(client.get_run, run_id)
    if run and (parent := run.data.tags.get(MLFLOW_PARENT_RUN_ID)):
        _call(client.log_batch, parent, metrics=_metrics(headline))


def log_lineage(stage: str) -> None:
    """What DVC knows of the stage, on its run: the md5 of each output as a ``dvc.md5.<path>`` tag (the very
    artifacts it made), and each data dependency (another stage's output: frames, flows, models; not code or
    params) as an MLflow dataset input named by its path with DVC's md5 as its digest (the run page's
    "Datasets used"). DVC's own hashing, from dvc.yaml in the working directory: it keeps what it computed,
    so DVC's commit after the stage does not hash them again."""
    if not (run_id := active_run_id()) or not Path("dvc.yaml").is_file():
        return
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            found = repo.stage.from_target(stage)[0]
            # hashing an output builds it, so its hash is set (the type allows None)
            tags = {f"dvc.md5.{out.def_path}": md5 for out in found.outs if (md5 := out.get_hash().value)}
            data = [
                dep
                for dep in found.deps
                if not isinstance(dep, ParamsDependency) and not dep.def_path.startswith(CODE_DIRS)
            ]
            inputs = [
                DatasetInput(
                    Dataset(
                        name=dep.def_path,
                        digest=dep.get_hash().value or "",
                        source_type="dvc",
                        source=json.dumps({"path": dep.def_path}),
                        profile=json.dumps({"size": dep.meta.size, "nfiles": dep.meta.nfiles}),
                    ),
                    [InputTag(MLFLOW_DATASET_CONTEXT, stage)],
                )
                for dep in data
            ]
    except (DvcException, OSError) as err:
        tqdm.write(f"warning: {stage}: no DVC hashes for its MLflow run: {err}", file=sys.stderr)
        return
    client = _store().client
    _call(client.log_batch, run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    if inputs:
        _call(client.log_inputs, run_id, datasets=inputs)


@contextlib.contextmanager
def system_metrics(run_id: str | None) -> Iterator[None]:
    """This machine's CPU, memory, disk and network use (GPU with ``pynvml``) as the run's ``system/*``
    metrics while the block runs, every 10 s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``); nothing
    without a run."""
    if run_id is None or _uri is None or _down:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = _call(SystemMetricsMonitor, run_id, tracking_uri=_uri)
    if monitor is not None:
        monitor.start()
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def log_image(image: np.ndarray, artifact_file: str) -> None:
    """An ``(H, W, 3)`` uint8 picture as a PNG artifact."""
    if run_id := active_run_id():
        _call(_store().client.log_image, run_id, image, artifact_file)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    if run_id := active_run_id():
        _call(_store().client.log_artifact, run_id, str(path), artifact_path)
