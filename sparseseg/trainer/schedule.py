"""Learning-rate schedules: a pure function of the iteration, so resuming needs no state.

- poly: lr * (1 - t / T)^0.9 (nnU-Net);
- step: lr x0.1 at 50% and again at 75% of the iterations (Cheng & Varshney);
- constant.
A linear warm-up from lr/100 over the first `warmup` iterations comes first in every schedule:
Adam's first steps on a freshly initialised network with BatchNorm are the unstable ones.
"""

from __future__ import annotations

from sparseseg.errors import SparsesegError

SCHEDULES = ("poly", "step", "constant")


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise SparsesegError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")


def lr_at(iteration: int, total: int, base: float, schedule: str, warmup: int = 0) -> float:
    """Learning rate for step `iteration` (0-based) of `total`."""
    check_schedule(schedule)
    if warmup and iteration < warmup:
        return base * (0.01 + 0.99 * iteration / warmup)
    t = iteration / max(1, total)
    if schedule == "poly":
        return base * (1 - t) ** 0.9
    if schedule == "step":
        return base * (0.01 if t >= 0.75 else 0.1 if t >= 0.5 else 1.0)
    return base


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
