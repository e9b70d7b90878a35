"""Models: timm's, the ones the thesis and the findings need that timm lacks, and the wrappers.

Importing this package registers, through timm's own registry, every architecture defined in it,
so ``timm.create_model(name)`` finds them afterwards:

* ``thesis``: the XCiT, CaiT, DeiT and ResNet variants the thesis used (``set_xcit_patch_size``).
* ``fan``: FAN, the Fully Attentional Networks, under the public code's names.
* ``covit``: the convolution-mixing ViT and its attention twin.

``factory.create_model`` builds any of them (or any timm model) for [0, 1] inputs, ``finetune``
loads a checkpoint of another data set's model, and ``advvit.wrappers`` holds ``NormalizedModel``
and ``unwrap`` (torch only, so the runtime layer can strip wrappers without importing timm).

Inputs are always pixels in [0, 1]. A model trained on normalized inputs carries the normalization
inside (``NormalizedModel``), so attacks and AutoAttack see the same [0, 1] box as the data.
"""
from __future__ import annotations

from typing import Iterable

from ..wrappers import NormalizedModel, unwrap
from . import covit, fan, thesis
from .factory import count_parameters, create_model
from .finetune import load_finetune_weights
from .thesis import *  # noqa: F401,F403  (the registered entrypoints, which timm lists in thesis.__all__)

__all__ = ["NormalizedModel", "create_model", "unwrap", "load_finetune_weights", *thesis.__all__]


def iter_registered() -> Iterable[str]:
    """Names this package registers in timm (FAN and the conv-mixing ViTs included)."""
    return tuple(thesis.default_cfgs) + fan.REGISTERED + covit.REGISTERED
