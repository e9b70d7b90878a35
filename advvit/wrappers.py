"""The wrappers around a model: ``NormalizedModel`` and ``unwrap``, the one function that strips them.

torch only: the runtime layer (``advvit.accel``) strips data-parallel wrappers for attacks and
must not pull timm in, and checkpoints strip everything down to the timm model they store.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["NormalizedModel", "unwrap"]


class NormalizedModel(nn.Module):
    """Wraps a timm model so it takes [0, 1] pixels and normalizes them itself.

    Attacks, AutoAttack and the data loaders all work in [0, 1] pixel space; the normalization a
    model was trained with lives here, so nobody can apply it twice or forget it. The wrapper
    keeps timm's interface: ``forward_features``, ``forward_head``, ``reset_classifier``,
    ``get_classifier``, ``num_classes``, ``num_features`` and ``pretrained_cfg`` /
    ``default_cfg``. Its ``pretrained_cfg`` reports mean 0 and std 1 (what the *wrapper* expects,
    so ``timm.data.resolve_data_config(model=wrapper)`` builds an identity normalization) and keeps
    the inner normalization under ``inner_mean`` / ``inner_std``.

    The mean and std are non-persistent buffers: they follow ``.to(device)`` but do not enter the
    state dict, which checkpoints take from the unwrapped timm model (see ``unwrap``) and whose
    metadata records the normalization.

    Args:
        model: the timm model.
        mean: per-channel mean, one value per input channel.
        std: per-channel std, one value per input channel, all > 0.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or mean_t.numel() == 0:
            raise ValueError(f"normalize mean and std need one value per channel each, got {mean} and {std}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"normalize std must be > 0 for every channel, got {tuple(std)}")
        in_chans = getattr(model, "in_chans", None)
        if in_chans is not None and mean_t.numel() not in (1, in_chans):
            raise ValueError(
                f"normalize has {mean_t.numel()} channel(s) but the model takes in_chans={in_chans}: "
                "give one mean/std per input channel")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    @property
    def normalization(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """The (mean, std) applied inside, as tuples of floats."""
        return tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels to the normalized inputs the inner model was trained on."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.normalize(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        self.model.reset_classifier(num_classes, *args, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def in_chans(self) -> int:
        return getattr(self.model, "in_chans", self.mean.shape[1])

    @property
    def pretrained_cfg(self) -> dict:
        cfg = dict(getattr(self.model, "pretrained_cfg", {}) or {})
        mean, std = self.normalization
        chans = self.in_chans
        cfg["inner_mean"], cfg["inner_std"] = mean, std
        cfg["mean"], cfg["std"] = (0.0,) * chans, (1.0,) * chans
        return cfg

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def no_weight_decay(self) -> set:
        inner = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in inner()} if callable(inner) else set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        mean, std = self.normalization
        return f"mean={mean}, std={std}"


_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)
STRIP = ("parallel", "runtime", "all")
Strip = Literal["parallel", "runtime", "all"]


def _inner(model: nn.Module) -> Optional[nn.Module]:
    """The module one wrapper down, or None when ``model`` wraps nothing."""
    if isinstance(model, _PARALLEL):
        return model.module
    orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, nn.Module):
        return orig
    if isinstance(model, NormalizedModel):
        return model.model
    return None


def unwrap(model: nn.Module, strip: Strip = "all") -> nn.Module:
    """Strip the wrappers around a model: the one function that does, for every caller.

    Args:
        model: a model, possibly inside DDP / DataParallel, ``torch.compile`` and
            ``NormalizedModel`` wrappers, in any nesting.
        strip: what to take off.
            "parallel": DDP / DataParallel and any ``torch.compile`` around them; a compiled
            module inside DDP stays (``compile(DDP(compile(m)))`` gives ``compile(m)``), as does
            ``NormalizedModel``. Without a data-parallel wrapper, ``model`` itself. The module
            attacks call (``accel.attack_model``).
            "runtime": DDP / DataParallel and ``torch.compile``: the ``NormalizedModel`` when
            there is one (the model as ``create_model`` built it), else the timm model.
            "all": also ``NormalizedModel``: the timm model, whose ``state_dict()`` checkpoints
            store.

    Raises:
        ValueError: an unknown ``strip``.
    """
    if strip not in STRIP:
        raise ValueError(f"strip must be one of {STRIP}, got {strip!r}")
    chain = [model]
    inner = _inner(model)
    while inner is not None and len(chain) < 16:  # a few levels at most; a cycle is a bug
        chain.append(inner)
        inner = _inner(inner)
    if strip == "parallel":
        parallel = [i for i, m in enumerate(chain) if isinstance(m, _PARALLEL)]
        return chain[parallel[-1] + 1] if parallel else model
    if strip == "runtime":
        return next((m for m in chain if isinstance(m, NormalizedModel)), chain[-1])
    return chain[-1]
