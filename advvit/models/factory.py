"""``create_model``: any timm model name, the ones registered in this package included, for [0, 1] inputs."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch.nn as nn

import timm

from ..wrappers import NormalizedModel, unwrap

__all__ = ["create_model", "count_parameters"]


def create_model(arch: str, *, num_classes: int, in_chans: int = 3,
                 img_size: Optional[Union[int, Tuple[int, int]]] = None, drop_path_rate: float = 0.0,
                 normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 **timm_kwargs: Any) -> nn.Module:
    """Build a timm model (registered here or in timm) for [0, 1] inputs.

    Args:
        arch: a timm model name, e.g. ``xcit_small_12_p16_224`` or ``xcit_nano_12_p4_32``.
        num_classes: classifier outputs.
        in_chans: input channels (1 for grayscale data fed as is).
        img_size: input size for architectures that fix one (ViTs); ignored by CNNs, which take any.
        drop_path_rate: stochastic depth rate.
        normalize: None (the model sees [0, 1] pixels directly) or ``(mean, std)``, one value per
            input channel: the model is then wrapped in ``NormalizedModel``.
        **timm_kwargs: passed to ``timm.create_model``.

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        ValueError: unknown ``arch`` or invalid arguments, naming the argument.
    """
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:10]
        raise ValueError(f"arch={arch!r} is not a timm model name (after importing advvit.models); "
                         f"similar names: {close}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate, **timm_kwargs)
    if img_size is None:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    else:
        try:
            model = timm.create_model(arch, pretrained=False, img_size=img_size, **kwargs)
        except TypeError as e:
            # CNNs (ResNet) take any input size and have no img_size argument.
            if "img_size" not in str(e):
                raise
            model = timm.create_model(arch, pretrained=False, **kwargs)
    if normalize is not None:
        try:
            mean, std = normalize
        except (TypeError, ValueError):
            raise ValueError(f"normalize must be None or (mean, std), got {normalize!r}") from None
        model = NormalizedModel(model, mean, std)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of a model (wrappers stripped)."""
    return sum(p.numel() for p in unwrap(model).parameters())
