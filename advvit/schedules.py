"""Eps schedules: pure functions of the optimizer step.

A schedule holds no state, so a resumed run gets the same eps at the same step. Every warm-up is
exact at both ends: 0 up to ``zero_steps``, exactly ``eps`` from ``zero_steps + warmup_steps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

__all__ = ["EpsSchedule", "create_eps_schedule", "SHAPES"]


def _linear(t: float) -> float:
    return t


def _cosine(t: float) -> float:
    # Zero slope at both ends: no jump in the rate at which the attack grows.
    return 0.5 * (1.0 - math.cos(math.pi * t))


def _sine(t: float) -> float:
    # Fast at first, gentle near the target eps.
    return math.sin(0.5 * math.pi * t)


SHAPES: Dict[str, Callable[[float], float]] = {
    "constant": _linear,
    "linear": _linear,
    "cosine": _cosine,
    "sine": _sine,
}


@dataclass(frozen=True)
class EpsSchedule:
    """``schedule(step) -> eps`` for the optimizer step ``step`` (0-based).

    Attributes:
        eps: the target eps.
        shape: "constant", "linear", "cosine" or "sine".
        warmup_steps: steps from 0 to ``eps`` (ignored by "constant").
        zero_steps: steps trained at eps 0 before the warm-up starts.
    """

    eps: float
    shape: str = "constant"
    warmup_steps: int = 0
    zero_steps: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"eps schedule shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        for name in ("warmup_steps", "zero_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def __call__(self, step: int) -> float:
        if step < self.zero_steps:
            return 0.0
        ramp = 0 if self.shape == "constant" else self.warmup_steps
        progress = step - self.zero_steps
        if progress >= ramp:
            return float(self.eps)
        return float(self.eps) * SHAPES[self.shape](progress / ramp)


def create_eps_schedule(shape: str, *, eps: float, warmup_steps: int = 0,
                        zero_steps: int = 0) -> EpsSchedule:
    """Build an eps schedule.

    Args:
        shape: "constant", "linear", "cosine" or "sine".
        eps: the target eps.
        warmup_steps: optimizer steps of the ramp from 0 to ``eps``.
        zero_steps: optimizer steps at eps 0 before the ramp.
    """
    return EpsSchedule(eps=eps, shape=shape, warmup_steps=warmup_steps, zero_steps=zero_steps)
