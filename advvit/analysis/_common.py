"""Plumbing the analyses share: batching, argument checks, per-example seeding and norms."""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch import Tensor, nn

ANALYSIS_NORMS = ("linf", "l2")
"""The norms the analyses' random controls and image scalings are written for."""
TINY = 1e-12
"""Keeps a division by a norm finite where the norm is exactly zero."""
LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights, as PIL's convert("L"): colour seen as one channel the way
:mod:`advvit.data` feeds colour data to a one-channel model."""


def device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU for an empty model."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``batch_size`` each, in order."""
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def check_batch_size(batch_size: int) -> None:
    """Raises ValueError unless ``batch_size`` is an integer >= 1."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def example_generator(seed: int, *keys: int) -> torch.Generator:
    """One CPU generator per (seed, purpose, example, ...): results do not depend on the batch
    size an analysis is run with."""
    value = seed
    for k in keys:
        value = (value * 1_000_003 + k) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(value)


def l2_per_example(t: Tensor) -> Tensor:
    """The L2 norm of each example of a batch, shape (N,)."""
    return t.flatten(1).norm(dim=1)


def check_analysis_norm(norm: str) -> None:
    """Refuse a norm the analyses' random controls and scalings were not written for.

    Raises:
        ValueError: naming the norms they take.
    """
    if norm not in ANALYSIS_NORMS:
        raise ValueError(f"norm must be one of {ANALYSIS_NORMS} for this analysis (its random "
                         f"controls and scalings are written for them), got {norm!r}")
