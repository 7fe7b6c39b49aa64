"""Data-parallel training under ``torchrun``: one code path for 1 or N processes, CPU (gloo) or GPU (NCCL).

Without torchrun's environment (or with ``WORLD_SIZE=1``) nothing here starts a process group: the
process is rank 0 of 1 and every helper is the identity. ``launch`` starts torchrun on this machine;
several machines run torchrun themselves (docs/scaling.md).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

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
    """Run ``python -m stages <stage>`` under ``torchrun --standalone`` with ``nproc`` processes on this
    machine, on ``params`` (written to a temporary YAML); its output streams through. ``env`` is added
    to the processes' environment."""
    with tempfile.TemporaryDirectory(prefix="lfdm-launch-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "stages", stage, "--params", str(path)]
        code = subprocess.run(cmd, check=False, env=os.environ | dict(env or {})).returncode
    if code:
        raise RuntimeError(f"stage {stage}: torchrun with {nproc} processes exited with code {code}")
