"""The training loop every trainer runs (:func:`fit`) and its parts: optimizer, schedules, sharded data,
and the state that makes an interrupted run resume exactly where it stopped."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from lfdm import distributed, tracking
from lfdm.checkpoint import load_checkpoint, save_checkpoint
from lfdm.config import LRScheduleName
from lfdm.device import autocast
from lfdm.errors import UserError

if TYPE_CHECKING:  # diffusers' training utilities take 2 s to import: only train_dm uses EMA
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)  # progress lines for an orchestrator's log (the Prefect flow shows them)


class TrainingDiverged(UserError, FloatingPointError):
    """A loss or a weight became inf/NaN; the message names the stage and the step."""


class LoopSettings(Protocol):
    steps: int
    log_every: int
    checkpoint_every: int


@runtime_checkable
class _EpochAware(Protocol):
    """A sampler or dataset told each new epoch (to reshuffle or redraw)."""

    def set_epoch(self, epoch: int) -> None: ...


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam with torch's fused kernel: on CPU the default steps each tensor in a Python loop, 3× slower
    (14 of the 250 ms of a default diffusion training step on 2 cores)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def multistep_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, milestones: Iterable[float], gamma: float
) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR with milestones given as fractions of the run (the paper's epochs 60/90 of 100 → 0.6, 0.9)."""
    steps = sorted({max(1, round(f * total_steps)) for f in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    kind: LRScheduleName,
    total_steps: int,
    milestones: Iterable[float],
    gamma: float,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``"multistep"``: :func:`multistep_schedule`; ``"linear"`` / ``"cosine"``: from the optimizer's lr down
    to 0 at ``total_steps`` (diffusers' schedules, no warm-up)."""
    if kind == "multistep":
        return multistep_schedule(optimizer, total_steps, milestones, gamma)
    # imported here: stages on another schedule (train_lfae, finetune_decoder) never import diffusers
    from diffusers.optimization import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=0, num_training_steps=total_steps)


def sharded_loader(
    dataset: Dataset, batch_size: int, key: str, *, seed: int, num_workers: int, generator: torch.Generator
) -> DataLoader:
    """This process's share of every global batch of ``batch_size`` (``key`` names it in errors).

    One seeded permutation per epoch; process r of W takes every W-th index, so step k's batches over all
    processes are exactly the single-process batch k. Workers are not persistent: a fresh copy of the
    dataset each epoch is how ``set_epoch`` (see :class:`BatchStream`) reaches them.
    """
    local = distributed.local_batch(batch_size, key)
    sampler = _ResumableSampler(
        dataset, num_replicas=distributed.world_size(), rank=distributed.rank(), shuffle=True, seed=seed
    )
    # a share smaller than one batch still trains (one short batch per epoch) instead of yielding nothing
    return DataLoader(
        dataset,
        batch_size=local,
        sampler=sampler,
        drop_last=len(sampler) >= local,
        num_workers=num_workers,
        generator=generator,
    )


class _ResumableSampler(DistributedSampler):
    """A DistributedSampler whose next pass starts ``skip`` indices in (the rest of a resumed epoch)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        indices, self.skip = list(super().__iter__())[self.skip :], 0
        return iter(indices)


class BatchStream:
    """A :func:`sharded_loader`'s batches across epochs, at a position a checkpoint can hold.

    Each epoch the sampler and the dataset (those with ``set_epoch``) are told the epoch, so every pass
    reshuffles and redraws, the same way on every process. The position is the epoch, the batches taken
    from it and the loader generator's state when it began (the workers' seeds are drawn from it); a
    stream loaded from it skips the taken batches by index, reading no data, and goes on as the
    uninterrupted one would.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.epoch, self.taken = loader, 0, 0
        self._batches: Iterator | None = None
        self._generator_state: torch.Tensor | None = None  # as the current epoch began
        self._resumed_generator: torch.Tensor | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        while True:
            if self._batches is None:
                self._batches = self._begin_epoch()
            try:
                batch = next(self._batches)
            except StopIteration:
                self.epoch, self.taken, self._batches = self.epoch + 1, 0, None
                continue
            self.taken += 1
            return batch

    def _begin_epoch(self) -> Iterator:
        """The batches of epoch ``self.epoch``, from batch ``self.taken`` on."""
        for part in (self.loader.sampler, self.loader.dataset):
            if isinstance(part, _EpochAware):
                part.set_epoch(self.epoch)
        generator = self.loader.generator
        if self._resumed_generator is not None:
            if generator is None:
                raise TypeError(
                    "the stream's position holds a loader generator's state; this loader has none"
                )
            generator.set_state(self._resumed_generator)
            self._resumed_generator = None
        self._generator_state = generator.get_state() if generator is not None else None
        if self.taken:
            if not isinstance(self.loader.sampler, _ResumableSampler) or self.loader.batch_size is None:
                raise TypeError("only a sharded_loader's stream can resume mid-epoch")
            self.loader.sampler.skip = self.taken * self.loader.batch_size
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "taken": self.taken, "generator": self._generator_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.taken, self._resumed_generator = state["epoch"], state["taken"], state["generator"]
        self._batches = None


class TrainingState:
    """Model + optimizer + LR schedule (+ EMA) + step + logged history (+ the batch stream's position and
    every process's random generators), saved atomically while training and resumed after an interruption
    when the config matches: the resumed run equals the uninterrupted one bit for bit on the same host, and
    its loss curves keep their start. A finished run removes it (:meth:`finish`): re-running trains afresh.

    ``model`` is the bare module, never its DistributedDataParallel wrapper, so the saved weights load in
    one process. With several processes only rank 0 reads and writes files; the others get its state.
    """

    def __init__(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        config: Mapping[str, Any],
        ema: EMAModel | None = None,
    ) -> None:
        self.path, self.model, self.optimizer, self.schedule = Path(path), model, optimizer, schedule
        self.ema = ema
        self.config = dict(config)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.batches: BatchStream | None = None

    def resume(self) -> bool:
        """Load the last state if it was written by the same config; a different config starts fresh."""
        state = distributed.broadcast(
            load_checkpoint(self.path) if distributed.is_main() and self.path.is_file() else None
        )
        if state is None:
            return False
        if state.get("config") != self.config:
            _say(f"{self.path}: written with other params, starting from step 0")
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(next(self.model.parameters()).device)
        self.step = int(state["step"])
        self.history = list(state["history"])
        if self.batches is not None and state.get("batches") is not None:
            self.batches.load_state_dict(state["batches"])
        if state.get("rng") is not None:
            _set_rng_state(state["rng"][distributed.rank()])
        _say(f"{self.path}: resumed at step {self.step}")
        return True

    def log(self, values: Mapping[str, float]) -> None:
        """Record values at the current step (history + the active MLflow run)."""
        self.history.append({"step": self.step, **values})
        tracking.log_metrics(values, step=self.step)

    def write_plot(self, path: str | Path) -> None:
        """The history as a TSV that ``dvc plots`` reads (x = step), also an artifact of the tracked run."""
        if not distributed.is_main():
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        lines = ["\t".join(keys)] + ["\t".join(f"{row.get(k, '')}" for k in keys) for row in self.history]
        path.write_text("\n".join(lines) + "\n")
        tracking.log_file(path)

    def finish(self) -> None:
        if distributed.is_main():
            self.path.unlink(missing_ok=True)

    def check_finite(self) -> None:
        """Refuse weights with an inf/NaN (before they are saved), naming the first such tensor and the step."""
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingDiverged(
                    f"{self.path.stem}: {name} holds inf/NaN values after step {self.step}"
                )

    def save(self) -> None:
        self.check_finite()
        rng = _gather(_rng_state())  # every process's, so each resumes its own streams
        if not distributed.is_main():
            return
        save_checkpoint(
            self.path,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            step=self.step,
            config=self.config,
            history=self.history,
            batches=self.batches.state_dict() if self.batches is not None else None,
            rng=rng,
        )


def fit(
    name: str,
    state: TrainingState,
    loader: DataLoader,
    loss: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]],
    cfg: LoopSettings,
    *,
    objective: str,
    device: torch.device,
    precision: str = "fp32",
    grad_clip: float | None = None,
) -> None:
    """Train ``state.model`` to ``cfg.steps``: the one loop of every trainer.

    Resumes from ``state`` when it was saved by the same config; each step moves the batch's tensors to
    ``device``, computes ``loss(batch)`` (a dict of scalars; ``objective`` is minimised, all are logged
    as ``loss/<key>`` every ``cfg.log_every`` steps with the lr), clips the gradient norm to ``grad_clip``,
    steps the optimizer, schedule and EMA, and saves ``state`` every ``cfg.checkpoint_every`` steps. A
    non-finite loss or weight stops it with :class:`TrainingDiverged`; nothing non-finite is saved. The
    caller sets the modules' train/eval modes before, and after saves the model, writes the plot and calls
    :meth:`TrainingState.finish`.
    """
    state.batches = BatchStream(loader)
    state.resume()
    with tqdm(
        total=cfg.steps, initial=state.step, desc=name, unit="step", disable=not distributed.is_main()
    ) as bar:
        while state.step < cfg.steps:
            batch = {
                k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in next(state.batches).items()
            }
            with autocast(device, precision):
                losses = loss(batch)
            if not torch.isfinite(losses[objective]):  # a host sync per step: cheap next to a training step
                raise TrainingDiverged(
                    f"{name}: the loss ({objective}) is {losses[objective].item()} at step {state.step + 1}; "
                    "lower the lr or check the data (nothing after the last checkpoint was saved)"
                )
            state.optimizer.zero_grad(set_to_none=True)
            losses[objective].backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
            state.optimizer.step()
            state.schedule.step()
            if state.ema is not None:
                state.ema.step(state.model.parameters())
            state.step += 1
            bar.update()
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                logged = {f"loss/{k}": v for k, v in distributed.mean(losses).items()}
                state.log(logged | {"lr": float(state.schedule.get_last_lr()[0])})
                bar.set_postfix(loss=f"{logged[f'loss/{objective}']:.4f}")
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                if distributed.is_main() and state.history:
                    latest = ", ".join(f"{k} {v:.4g}" for k, v in state.history[-1].items() if k != "step")
                    log.info("%s: step %d/%d (%s)", name, state.step, cfg.steps, latest)
                if state.step < cfg.steps:
                    state.save()
    state.check_finite()


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)  # plain types: checkpoints load with weights_only=True
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            **numpy_state,
            "state": {
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                "pos": numpy_state["state"]["pos"],
            },
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": numpy_state["state"]["key"].numpy().astype(np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.set_state(numpy_state)
    random.setstate(state["python"])


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order."""
    if distributed.world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _say(message: str) -> None:
    if distributed.is_main():
        print(message)
