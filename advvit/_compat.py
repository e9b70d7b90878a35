"""Workarounds for broken installs, kept in one place.

The only one today: a CPU-only torch next to a CUDA-built torchvision wheel. torchvision's
compiled ``_C`` library cannot load there, yet ``torchvision._meta_registrations`` still registers
fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, so ``import torchvision`` (and
with it ``import timm``) fails with ``operator torchvision::nms does not exist``. Defining those two
schemas before torchvision is imported lets its pure-Python parts (transforms, datasets, models,
``ops.misc``) work; the compiled ops themselves still fail, and timm does not use them.

On a healthy install the library loads and this module does nothing.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: dropping the Library object would unregister the schemas
guard_applied = False


def _torchvision_library() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")) + glob.glob(
        os.path.join(spec.submodule_search_locations[0], "_C*.pyd"))
    return found[0] if found else None


def guard_torchvision() -> bool:
    """Make ``import torchvision`` work when its compiled library cannot load.

    Returns:
        True when the guard had to define the schemas, False when nothing was needed.
    """
    global _library, guard_applied
    if guard_applied or "torchvision" in sys.modules:
        return guard_applied
    path = _torchvision_library()
    if path is None:
        return False
    try:
        torch.ops.load_library(path)
        return False
    except (OSError, RuntimeError):
        pass
    try:
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _library.define(schema)
    except RuntimeError:
        # Another library already defined them: nothing left to do.
        return False
    guard_applied = True
    return True
