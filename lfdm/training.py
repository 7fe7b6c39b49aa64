"""Pieces shared by the two training loops (the loops themselves read top to bottom in stages/)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lfdm import tracking
from lfdm.checkpoint import load_checkpoint, save_checkpoint


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def multistep_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, milestones: Iterable[float], gamma: float
) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR with milestones given as fractions of the run (the paper's epochs 60/90 of 100 → 0.6, 0.9)."""
    steps = sorted({max(1, round(f * total_steps)) for f in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)


def forever(loader: Iterable) -> Iterator:
    """Cycle a DataLoader across epochs (reshuffling each pass)."""
    while True:
        yield from loader


class TrainingState:
    """Model + optimizer + LR schedule + step + logged history, saved atomically while training and
    resumed after an interruption when the config matches (the history comes back too, so loss curves
    survive). A finished run removes it (:meth:`finish`): re-running a stage trains afresh."""

    def __init__(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        config: Mapping[str, Any],
    ) -> None:
        self.path, self.model, self.optimizer, self.schedule = Path(path), model, optimizer, schedule
        self.config = dict(config)
        self.step = 0
        self.history: list[dict[str, float]] = []

    def resume(self) -> bool:
        """Load the last state if it was written by the same config; a different config starts fresh."""
        if not self.path.is_file():
            return False
        state = load_checkpoint(self.path)
        if state.get("config") != self.config:
            print(f"{self.path}: written with other params, starting from step 0")
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        print(f"{self.path}: resumed at step {self.step}")
        return True

    def log(self, values: Mapping[str, float]) -> None:
        """Record values at the current step (history + the active MLflow run)."""
        self.history.append({"step": self.step, **values})
        tracking.log_metrics(values, step=self.step)

    def write_plot(self, path: str | Path) -> None:
        """The history as a TSV that ``dvc plots`` reads (x = step)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        lines = ["\t".join(keys)] + ["\t".join(f"{row.get(k, '')}" for k in keys) for row in self.history]
        path.write_text("\n".join(lines) + "\n")

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)

    def save(self) -> None:
        save_checkpoint(
            self.path,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(),
            step=self.step,
            config=self.config,
            history=self.history,
        )
