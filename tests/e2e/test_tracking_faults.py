"""Tracking never costs work: a training stage whose real ``mlflow server`` dies mid-run completes with one
warning; ``tracking.required`` fails fast instead; ``dvc exp run --temp`` keeps its runs, tagged with the md5
of the outputs DVC recorded."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from lfdm import tracking

from .conftest import free_port, make_project, service_env, start_mlflow_server, stop

pytestmark = pytest.mark.slow


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning: MLflow")]


def test_a_training_stage_completes_when_its_mlflow_server_dies(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home, port = tmp_path / "server", free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}"
    project = make_project(
        tmp_path / "project",
        {"tracking": {"experiment": "faults"}, "train_lfae": {"steps": 2, "log_every": 1}},
    )
    env = service_env(tmp_path, MLFLOW_TRACKING_URI=url)
    server = start_mlflow_server(home, port)
    try:
        subprocess.run(
            [sys.executable, "-m", "stages", "preprocess"],
            cwd=project,
            env=env,
            check=True,
            capture_output=True,
        )
        stage = subprocess.Popen(
            [sys.executable, "-m", "stages", "train_lfae"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        client = MlflowClient(url)
        deadline = time.monotonic() + 300
        while True:  # until the stage has logged its first step, then the server dies (all its processes)
            assert stage.poll() is None and time.monotonic() < deadline, "train_lfae ended before step 1"
            found = client.search_runs(
                [client.get_experiment_by_name("faults").experiment_id], "tags.`lfdm.stage` = 'train_lfae'"
            )
            if found and client.get_metric_history(found[0].info.run_id, "loss/total"):
                break
            time.sleep(0.1)
        for process in [*psutil.Process(server.pid).children(recursive=True), psutil.Process(server.pid)]:
            process.kill()
        server.wait()
        killed = time.monotonic()
        output, _ = stage.communicate(timeout=300)
    finally:
        stop(server)
    print(f"train_lfae finished {time.monotonic() - killed:.1f} s after its MLflow server died")
    assert stage.returncode == 0, output[-3000:]
    assert len(warnings_in(output)) == 1 and url in warnings_in(output)[0], output[-3000:]
    assert (project / "data/models/lfae.pt").is_file() and (project / "metrics/train_lfae.json").is_file()

    # the run its stage could not end is not left RUNNING: the next stage on this host marks it KILLED
    server = start_mlflow_server(home, port)
    try:
        assert tracking.configure(url, "faults")
        assert client.get_run(found[0].info.run_id).info.status == "KILLED"
    finally:
        stop(server)


def test_required_tracking_fails_fast_naming_the_uri(tmp_path):
    project = make_project(tmp_path / "project", {"tracking": {"required": True}})
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "stages", "preprocess"],
        cwd=project,
        capture_output=True,
        text=True,
        env=service_env(tmp_path, MLFLOW_TRACKING_URI=url),
        check=False,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: preprocess: MLflow tracking at {url} failed" in result.stderr
    assert not (project / "data/manifest.parquet").exists()  # it failed before any work
    assert elapsed < 30, elapsed  # the interpreter and torch's import included


def test_dvc_exp_run_temp_keeps_its_mlflow_runs(tmp_path):
    project = make_project(tmp_path / "project")  # the default store: sqlite:///mlflow.db
    result = subprocess.run(
        ["dvc", "exp", "run", "--temp", "preprocess"],
        cwd=project,
        env=service_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")  # at the repository's root, not in the temp copy
    experiment = client.get_experiment_by_name("lfdm")
    found = client.search_runs([experiment.experiment_id])
    runs = {run.data.tags.get("lfdm.stage", "parent"): run for run in found}
    assert runs["preprocess"].info.status == "FINISHED" and int(runs["preprocess"].data.params["videos"]) > 0
    assert runs["parent"].info.run_name == runs["parent"].data.tags["dvc.exp_name"]  # the experiment's name
    assert experiment.artifact_location == (project / "mlruns/lfdm").as_uri()

    # the run names the outputs DVC recorded for the experiment, by their md5
    ref = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=project,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    lock = yaml.safe_load(
        subprocess.run(
            ["git", "show", f"{ref}:dvc.lock"], cwd=project, check=True, capture_output=True, text=True
        ).stdout
    )
    recorded = {f"dvc.md5.{out['path']}": out["md5"] for out in lock["stages"]["preprocess"]["outs"]}
    assert len(recorded) == 4 and {k: runs["preprocess"].data.tags.get(k) for k in recorded} == recorded
