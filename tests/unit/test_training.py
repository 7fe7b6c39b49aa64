"""Learning-rate schedules of the training loops."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from lfdm.training import lr_schedule


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
