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

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The real params.yaml, shrunk: every stage runs in seconds on a CPU, same code paths.
TINY = {
    "data": {
        "image_size": 32,
        "num_frames": 4,
        "embedded": {"clips_per_image": 2, "test_images": 2, "max_train_images": 4, "source_frames": 6},
    },
    "lfae": {
        "base_channels": 8,
        "decoder_res_blocks": 1,
        "num_regions": 4,
        "region_block_expansion": 8,
        "region_num_blocks": 2,
        "region_max_features": 32,
        "flow_block_expansion": 8,
        "flow_num_blocks": 2,
        "flow_max_features": 32,
        "bg_block_expansion": 8,
        "bg_num_blocks": 2,
        "bg_max_features": 32,
        "corr_channels": 8,
        "corr_radius": 2,
    },
    "pretrain_flow": {
        "teacher": "dis_ultrafast",
        "teacher_scale": 1,
        "pairs_per_clip": 2,
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    # stage one from scratch, so train_lfae runs on its own; test_real_footage takes the distilled F (the default)
    "train_lfae": {
        "init": None,
        "freeze_motion": False,
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    "extract_flow": {"batch_size": 4},
    "dm": {
        "unet": {"dim": 8, "dim_mults": [1, 2], "resnet_groups": 4, "attn_heads": 2, "attn_dim_head": 8},
        "diffusion": {"timesteps": 50},
    },
    "train_dm": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
    "sample": {
        "steps": 2,
        "extra_labels": ["zoom in slowly"],
        "extra_label_videos": 1,
        "batch_size": 4,
        "seen_videos": 2,
    },
    "evaluate": {"max_grid_videos": 2, "classifier_steps": 5},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return out


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
    params = merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), overrides or {})
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
