"""End-to-end fixtures: a tiny copy of the project in a temporary git + DVC repo, and real local
servers (``mlflow server``, ``prefect server``) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tiny import tiny_tree

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def service_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        DVC_NO_ANALYTICS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(home / "prefect-home"),
        GIT_AUTHOR_NAME="lfdm-test",
        GIT_AUTHOR_EMAIL="test@localhost",
        GIT_COMMITTER_NAME="lfdm-test",
        GIT_COMMITTER_EMAIL="test@localhost",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def make_project(path: Path, overrides: dict | None = None) -> Path:
    """Copy the pipeline into ``path`` as a fresh git + DVC repo with shrunk params."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lfdm", "stages", "flows"):
        shutil.copytree(ROOT / name, path / name, ignore=ignore)
    for name in ("dvc.yaml", "prefect.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, path / name)
    params = tiny_tree(overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    env = service_env(path)
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.check_update", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny lfdm project"],
    ):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True)
    return path


def train_until_first_checkpoint(project: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python -m stages train_lfae`` in ``project``, returned once its resume checkpoint exists."""
    checkpoint = project / "data/checkpoints/train_lfae.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages", "train_lfae"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            "train_lfae ended before its first checkpoint"
        )
        time.sleep(0.05)
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_mlflow_server(home: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` (SQLite backend and proxied artifact store in ``home``) on 127.0.0.1:``port``,
    once it answers."""
    log = home / "server.log"
    env = service_env(home, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with log.open("a") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{home}/mlflow.db",
                "--artifacts-destination",
                str(home / "artifacts"),
            ],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 120, log)
    except BaseException:
        stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1, shared by the session."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """A real ``prefect server`` on 127.0.0.1; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port, log = free_port(), home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=home,
            env=service_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", proc, 120, log)
        yield api
    finally:
        stop(proc)
