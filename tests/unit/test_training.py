"""The training loop: learning-rate schedules, exact resume, non-finite losses and weights."""

from __future__ import annotations

import logging
import random
from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lfdm.training import (
    TrainingDiverged,
    TrainingState,
    adam,
    fit,
    lr_schedule,
    seed_everything,
    sharded_loader,
)


def lrs(kind: str, steps: int = 10) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = lr_schedule(optimizer, kind, steps, milestones=(0.5, 0.8), gamma=0.1)
    seen = []
    for _ in range(steps + 1):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return seen


def test_multistep_drops_by_gamma_at_the_milestone_fractions() -> None:
    assert lrs("multistep") == pytest.approx([1.0] * 5 + [0.1] * 3 + [0.01] * 3)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_schedules_fall_from_lr_to_zero_over_the_run(kind: str) -> None:
    seen = lrs(kind)
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in pairwise(seen))  # strictly decreasing, no plateau
    assert seen[5] == pytest.approx(0.5)  # both pass through half the lr halfway


class _Noisy(torch.utils.data.Dataset):
    """Inputs with a per-epoch random flip (from ``(epoch, index)``, as the project's datasets draw)."""

    def __init__(self) -> None:
        self.x, self.epoch = torch.randn(10, 4, generator=torch.Generator().manual_seed(1)), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sign = 1.0 if (self.epoch * 7 + index) % 3 else -1.0
        return {"x": sign * self.x[index], "index": torch.tensor(index)}


def _train(path, steps: int, interrupt_at: int | None = None) -> tuple[torch.nn.Module, TrainingState]:
    """A tiny model through :func:`fit`: global-RNG noise and dropout in the loss, numpy and python draws,
    2 batches of 4 per epoch (2 of the 10 examples dropped, others each epoch), EMA, a checkpoint every 3 steps."""
    from diffusers.training_utils import EMAModel

    generator = seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = adam(model.parameters(), 1e-2, (0.9, 0.99))
    schedule = lr_schedule(optimizer, "cosine", steps, (), 1.0)
    ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    state = TrainingState(path, model, optimizer, schedule, {"steps": steps}, ema)
    loader = sharded_loader(_Noisy(), 4, "batch_size", seed=0, num_workers=0, generator=generator)

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        if state.step + 1 == interrupt_at:
            raise KeyboardInterrupt
        noise = torch.randn(len(batch["x"]), 1) * float(np.random.rand()) * random.random()
        return {"total": (model(batch["x"]) - noise).square().mean()}

    model.train()
    fit(
        "tiny",
        state,
        loader,
        loss,
        SimpleNamespace(steps=steps, log_every=1, checkpoint_every=3),
        objective="total",
        device=torch.device("cpu"),
    )
    return model, state


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, capsys):
    whole, whole_state = _train(tmp_path / "whole.pt", steps=14)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut.pt", steps=14, interrupt_at=11)
    saved = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert (saved["step"], saved["batches"]["epoch"], saved["batches"]["taken"]) == (9, 4, 1)  # mid-epoch
    (
        torch.manual_seed(123),
        np.random.seed(123),
        random.seed(123),
    )  # as in a new process: other generator states
    resumed, resumed_state = _train(tmp_path / "cut.pt", steps=14)
    assert "resumed at step 9" in capsys.readouterr().out
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(whole_state.ema.shadow_params, resumed_state.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert resumed_state.history == whole_state.history
    ends = [state.batches.state_dict() for state in (whole_state, resumed_state)]
    assert [(end["epoch"], end["taken"]) for end in ends] == [(6, 2)] * 2
    assert torch.equal(ends[0]["generator"], ends[1]["generator"])


def test_training_logs_its_progress_at_each_checkpoint_and_the_end(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lfdm"):
        _, state = _train(tmp_path / "state.pt", steps=7)
    lines = [r.getMessage() for r in caplog.records if r.name == "lfdm.training"]
    assert [line.split(" (")[0] for line in lines] == ["tiny: step 3/7", "tiny: step 6/7", "tiny: step 7/7"]
    assert lines[-1].endswith(f"(loss/total {state.history[-1]['loss/total']:.4g}, lr 0)")


def test_a_run_resumed_without_its_generators_differs(tmp_path):
    """The test above can fail: dropping the saved generator states changes the resumed run."""
    whole, _ = _train(tmp_path / "whole.pt", steps=14)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut.pt", steps=14, interrupt_at=11)
    saved = torch.load(tmp_path / "cut.pt", weights_only=True)
    torch.save(saved | {"rng": None}, tmp_path / "cut.pt")
    torch.manual_seed(123)
    resumed, _ = _train(tmp_path / "cut.pt", steps=14)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


def test_a_non_finite_loss_stops_training_naming_the_step_and_saves_nothing(tmp_path):
    model = torch.nn.Linear(4, 1)
    optimizer = adam(model.parameters(), 1e-2, (0.9, 0.99))
    state = TrainingState(
        tmp_path / "state.pt", model, optimizer, lr_schedule(optimizer, "linear", 9, (), 1.0), {}
    )
    loader = sharded_loader(_Noisy(), 4, "batch_size", seed=0, num_workers=0, generator=torch.Generator())

    def loss(batch: dict) -> dict[str, torch.Tensor]:
        value = model(batch["x"]).square().mean()
        return {"total": value * (float("nan") if state.step == 5 else 1.0)}

    with pytest.raises(TrainingDiverged, match=r"tiny: the loss \(total\) is nan at step 6"):
        fit(
            "tiny",
            state,
            loader,
            loss,
            SimpleNamespace(steps=9, log_every=1, checkpoint_every=2),
            objective="total",
            device=torch.device("cpu"),
        )
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 4  # the last finite checkpoint
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"state: weight holds inf/NaN values after step 5"):
        state.save()
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 4  # not overwritten
