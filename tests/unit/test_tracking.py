"""lfdm.tracking is best effort: where the store lives, what an unreachable or failing store costs, and how
runs end (FINISHED, FAILED, KILLED; never left RUNNING)."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow import MlflowClient

from lfdm import tracking

PARAMS = {"seed": 0, "train_dm": {"steps": 4, "lr": 1e-3}}


pytestmark = pytest.mark.usefixtures("clean_env")  # and `store`: tests/unit/conftest.py


def runs(store: str, experiment: str) -> dict[str, object]:
    """An experiment's runs by stage, the parent as "parent"."""
    client = MlflowClient(store)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {run.data.tags.get("lfdm.stage", "parent"): run for run in found}


def test_the_default_store_is_at_the_repository_root(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    temp_copy = repo / ".dvc/tmp/exps/tmpk2j4"  # where `dvc exp run --temp` runs the stages
    (temp_copy / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    assert tracking.resolve_uri(None) == f"sqlite:///{repo}/mlflow.db"
    assert tracking.resolve_uri("sqlite:///runs/lfdm.db") == f"sqlite:///{repo}/runs/lfdm.db"
    monkeypatch.chdir(repo / ".dvc")
    assert tracking.resolve_uri(None) == f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # DVC names the original repository to every stage
    assert tracking.resolve_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert tracking.resolve_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert tracking.resolve_uri("http://mlflow:5000") == "http://team:5000"


def test_a_new_experiment_keeps_its_artifacts_beside_the_database(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a temporary workspace: nothing may land here
    assert tracking.configure(store, "artifacts")
    location = MlflowClient(store).get_experiment_by_name("artifacts").artifact_location
    assert location == (Path(store.removeprefix("sqlite:///")).parent / "mlruns/artifacts").as_uri()


@pytest.fixture()
def dead_ports():
    """A port nobody listens on (refused at once), one that accepts connections but never answers (as a hung
    server or an unroutable host does), and a host name that never resolves (RFC 2606)."""
    with socket.socket() as closed, socket.socket() as silent:
        closed.bind(("127.0.0.1", 0))
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        local = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in (closed, silent)]
        yield [*local, "http://lfdm.invalid:5000"]


def test_an_unreachable_store_costs_one_warning_and_seconds(dead_ports, capsys):
    for uri in dead_ports:
        start = time.monotonic()
        assert not tracking.configure(uri, "lfdm")
        with tracking.stage_run("train_dm", PARAMS, PARAMS["train_dm"]) as run_id:
            tracking.log_metrics({"loss": 1.0}, step=1)
            tracking.log_file(__file__)
        elapsed = time.monotonic() - start
        assert run_id is None and elapsed < tracking.CONNECT_TIMEOUT + 2, (uri, elapsed)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and uri in warnings[0] and "going on untracked" in warnings[0], warnings

    for uri in dead_ports:
        start = time.monotonic()
        with pytest.raises(tracking.TrackingError, match=f"tracking at {uri} failed.*tracking.required"):
            tracking.configure(uri, "lfdm", required=True)
        assert time.monotonic() - start < tracking.CONNECT_TIMEOUT + 2


def test_a_corrupt_store_costs_one_warning(tmp_path, capsys):
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    assert not tracking.configure(f"sqlite:///{tmp_path}/mlflow.db", "lfdm")
    with tracking.stage_run("train_dm", PARAMS, PARAMS["train_dm"]) as run_id:
        tracking.log_metrics({"loss": 1.0}, step=1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert run_id is None and len(warnings) == 1 and f"{tmp_path}/mlflow.db" in warnings[0], warnings


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED"), (SystemExit, "KILLED")],
)
def test_runs_end_with_the_stage(store, error, status):
    experiment = f"end-{status}-{error and error.__name__}"
    assert tracking.configure(store, experiment)
    with (
        pytest.raises(error) if error else contextlib.nullcontext(),
        tracking.stage_run("train_dm", PARAMS, PARAMS["train_dm"]) as run_id,
    ):
        tracking.log_metrics({"loss/total": 0.5}, step=3)
        if error:
            raise error
    found = runs(store, experiment)
    child, parent = found["train_dm"], found["parent"]  # a stage outside any pipeline opens its own parent
    assert child.info.run_id == run_id and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (child.info.status, parent.info.status) == (status, status)
    assert child.data.params == {"train_dm.steps": "4", "train_dm.lr": "0.001"}
    assert parent.data.params["train_dm.steps"] == "4"
    assert MlflowClient(store).get_metric_history(run_id, "loss/total")[0].step == 3


def test_runs_of_processes_that_no_longer_exist_end_killed(store):
    assert tracking.configure(store, "orphans")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("orphans").experiment_id
    here = socket.gethostname()
    owners = {
        "killed -9": {"lfdm.host": here, "lfdm.process": "999999999@1.0"},
        "pid reused": {"lfdm.host": here, "lfdm.process": f"{psutil.Process().pid}@1.0"},
        "alive": tracking._owner(),
        "other host": {"lfdm.host": f"not-{here}", "lfdm.process": "999999999@1.0"},
    }
    for name, tags in owners.items():
        client.create_run(experiment, run_name=name, tags=tags)
    assert tracking.configure(store, "orphans")  # what every stage does first
    status = {run.info.run_name: run.info.status for run in client.search_runs([experiment])}
    assert status == {
        "killed -9": "KILLED",
        "pid reused": "KILLED",
        "alive": "RUNNING",
        "other host": "RUNNING",
    }


def test_a_store_failing_mid_run_costs_one_warning(store, capsys):
    assert tracking.configure(store, "mid-run")
    calls = []

    def dead(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("Connection refused")

    # own patch contexts: undoing the test's monkeypatch would also undo clean_env's
    with tracking.stage_run("train_dm", PARAMS, PARAMS["train_dm"]), pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking.MlflowClient, "log_batch", dead)
        for step in range(5):
            tracking.log_metrics({"loss": 1.0}, step=step)
        tracking.log_image(np.zeros((4, 4, 3), "uint8"), "x.png")
    assert len(calls) == 1  # after the first failure nothing more is sent
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "Connection refused" in warnings[0] and store in warnings[0]

    assert tracking.configure(store, "mid-run-required", required=True)
    with (
        pytest.raises(tracking.TrackingError, match="Connection refused.*tracking.required is true"),
        tracking.stage_run("train_dm", PARAMS, PARAMS["train_dm"]),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr(tracking.MlflowClient, "log_batch", dead)
        tracking.log_metrics({"loss": 1.0}, step=1)
    assert runs(store, "mid-run-required")["train_dm"].info.status == "FAILED"


def test_results_are_counts_as_params_and_measurements_with_the_headline_on_the_parent(store):
    assert tracking.configure(store, "results")
    with tracking.stage_run("evaluate", PARAMS, {}):
        tracking.log_results(
            {"fvd/lfdm": 400.0, "l1/lfdm": 0.05, "test_videos": 64},
            headline={"fvd/lfdm": 400.0, "fvd_vs_static/lfdm": 0.4},
        )
    found = runs(store, "results")
    assert found["evaluate"].data.metrics == {"fvd/lfdm": 400.0, "l1/lfdm": 0.05}
    assert found["evaluate"].data.params["test_videos"] == "64"
    assert found["parent"].data.metrics == {"fvd/lfdm": 400.0, "fvd_vs_static/lfdm": 0.4}


def test_a_pipeline_run_is_named_after_the_experiment_and_kept_only_when_a_stage_ran(store, monkeypatch):
    assert tracking.configure(store, "pipelines")
    monkeypatch.setenv("DVC_EXP_NAME", "tidal-wave")  # what `dvc exp run` exports
    with tracking.pipeline_run(PARAMS, "lfdm repro") as kept, tracking.stage_run("train_dm", PARAMS, {}):
        pass
    with tracking.pipeline_run(PARAMS, "lfdm repro") as dropped:
        pass  # every stage was up to date
    client = MlflowClient(store)
    info = client.get_run(kept).info
    assert (info.run_name, info.status) == ("tidal-wave", "FINISHED")
    assert client.get_run(dropped).info.lifecycle_stage == "deleted"


def test_the_headline_is_evaluates_scores_and_their_ratios_to_the_static_baseline():
    from stages import _headline

    metrics = {
        "fvd/lfdm": 434.0,
        "fvd/oracle": 368.0,
        "fvd/static": 1020.0,
        "l1/lfdm": 0.055,
        "l1/oracle": 0.035,
        "l1/static": 0.1,
        "accuracy/lfdm": 0.92,
        "accuracy/real": 0.94,
        "seen_videos": 32,
    }
    headline = _headline("evaluate", metrics)
    assert headline["fvd_vs_static/oracle"] == pytest.approx(368 / 1020)
    assert headline["l1_vs_static/lfdm"] == pytest.approx(0.55) and headline["accuracy/lfdm"] == 0.92
    assert "seen_videos" not in headline and _headline("train_dm", metrics) == {}


def test_a_disabled_stage_opens_no_run(store, tmp_path):
    from lfdm.config import Params
    from stages import execute

    params = Params(
        paths={"finetune": str(tmp_path / "finetune"), "metrics": str(tmp_path / "metrics")},
        tracking={"uri": store, "experiment": "disabled"},
    )
    assert not params.finetune_decoder.enabled
    assert execute("finetune_decoder", params) == {"enabled": 0}
    experiment = MlflowClient(store).get_experiment_by_name("disabled")
    assert experiment is None or not MlflowClient(store).search_runs([experiment.experiment_id])
