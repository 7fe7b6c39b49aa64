"""Data-parallel training under ``torchrun``: one code path for 1 or N processes, CPU (gloo) or GPU (NCCL).

Without torchrun's environment (or with ``WORLD_SIZE=1``) nothing here starts a process group: the
process is rank 0 of 1 and every helper is the identity. ``launch`` starts the processes of one machine
itself, with torchrun's environment and a rendezvous on 127.0.0.1 only; several machines run torchrun
themselves, with an explicit rendezvous address (docs/scaling.md).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import psutil
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lfdm.config import Params

T = TypeVar("T")


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and logs to MLflow."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL for CUDA, gloo otherwise) and return this process's device:
    ``cuda:LOCAL_RANK`` on GPUs, ``device`` itself otherwise (and always with one process)."""
    if world_size() == 1:
        return device
    if device.type == "cuda":
        local, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= visible:
            raise RuntimeError(f"process {local} on this node has no GPU: torch sees {visible}; lower nproc")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)  # NCCL wants it destroyed before the interpreter exits
    return device


def local_batch(batch_size: int, key: str) -> int:
    """This process's share of a global batch; the error names the params key."""
    if batch_size % world_size():
        raise ValueError(f"{key}: {batch_size} is not divisible by the {world_size()} training processes")
    return batch_size // world_size()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel with several processes, ``model`` itself with one. On CUDA its
    BatchNorm layers become SyncBatchNorm (in place), so statistics cover the global batch as with one
    process (the official code synchronises BN too); gloo has no SyncBatchNorm, so on CPU each process
    normalises its own share. Save ``model``, not the wrapper, so checkpoints load in one process."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def mean(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors averaged over all processes (the global batch's value, for logging)."""
    stacked = torch.stack([v.detach().float() for v in values.values()])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(values, stacked.tolist(), strict=True))


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every process (a checkpoint read on rank 0: no shared filesystem needed)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(stage: str, params: Params, nproc: int, env: Mapping[str, str] | None = None) -> None:
    """Run ``python -m stages <stage>`` in ``nproc`` processes on this machine, on ``params`` (written to a
    temporary YAML); their output streams through. ``env`` is added to the processes' environment."""
    with tempfile.TemporaryDirectory(prefix="lfdm-launch-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        failed = run_workers([sys.executable, "-m", "stages", stage, "--params", str(path)], nproc, env)
    if failed:
        rank, code = failed
        raise RuntimeError(f"stage {stage}: process {rank} of {nproc} exited with code {code}")


def run_workers(
    cmd: Sequence[str], nproc: int, env: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """``cmd`` as ranks 0 … ``nproc`` − 1 of one machine, as ``torchrun --standalone`` runs it, except
    that nothing listens beyond 127.0.0.1: torchrun's rendezvous stores bind every interface, so this
    process serves the one store itself on the loopback address, and gloo's and NCCL's sockets take the
    loopback interface. The first process to fail stops the others; returns its (rank, exit code), or
    None when all succeed. Ctrl-C or SIGTERM here stops them all."""
    with _loopback_store() as port:
        workers = [
            subprocess.Popen(cmd, env=os.environ | worker_env(rank, nproc, port) | dict(env or {}))
            for rank in range(nproc)
        ]
        try:
            while True:
                codes = [worker.poll() for worker in workers]
                if failed := next(((rank, code) for rank, code in enumerate(codes) if code), None):
                    return failed
                if all(code == 0 for code in codes):
                    return None
                time.sleep(0.1)
        finally:
            _stop(workers)


def worker_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """What torchrun gives each process of one machine, with the rendezvous at 127.0.0.1:``port``."""
    interfaces = psutil.net_if_addrs().items()
    loopback = next((name for name, addrs in interfaces if "127.0.0.1" in {a.address for a in addrs}), "lo")
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # MASTER_ADDR:MASTER_PORT's store exists: every rank joins
        "GLOO_SOCKET_IFNAME": loopback,
        "NCCL_SOCKET_IFNAME": loopback,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # torchrun's default: one thread each
    }


@contextlib.contextmanager
def _loopback_store() -> Iterator[int]:
    """A c10d TCPStore served by this process on 127.0.0.1 only (it takes over a socket bound there, as
    it cannot be told an address to bind); yields its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    # dist.TCPStore is public API, re-exported in a way pyright takes for private
    store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
        "127.0.0.1", port, is_master=True, master_listen_fd=sock.detach(), wait_for_workers=False
    )
    try:
        yield port
    finally:
        del store  # closes the socket


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
