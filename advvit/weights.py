"""A model's weights: whether a state dict fits a model, the checksums naming it, ``CheckpointError``.

torch only, below the models and the checkpoint format: fine-tuning (``advvit.models``) and
checkpoint loading raise the same error from the same fit check, and the evaluation runner keys
its state files by ``weights_digest`` without importing timm. ``advvit.checkpoint`` re-exports
every name here.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any, Dict, Mapping, Sequence

import torch
import torch.nn as nn

from .wrappers import unwrap

__all__ = ["CheckpointError", "state_dict_misfit", "check_state_dict_fits", "weights_checksums", "weights_digest"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what does not match and what to do."""


def _tensor_crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes (as stored: the same on every device)."""
    head = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy(), head) if flat.numel() else head


def weights_checksums(state_dict: Mapping[str, Any]) -> Dict[str, int]:
    """A CRC-32 of each tensor of ``state_dict`` (dtype, shape, bytes), by key, in its order."""
    return {k: _tensor_crc(v) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def weights_digest(state_dict: Mapping[str, Any]) -> str:
    """One sha256 naming a set of weights (over the keys and their tensors' CRC-32s), cheap enough
    to key what was computed from them (an evaluation's state file)."""
    listed = json.dumps(list(weights_checksums(state_dict).items()))
    return hashlib.sha256(listed.encode()).hexdigest()


def _shape(value: Any) -> Any:
    """A tensor's shape as a tuple; anything else (which no model can load) by its type name."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _listed(label: str, items: Sequence[str], limit: int) -> str:
    more = f" ... ({len(items)} in all)" if len(items) > limit else ""
    return f"{label} {list(items[:limit])}{more}"


def state_dict_misfit(model: nn.Module, state_dict: Mapping[str, Any], *,
                      optional: Sequence[str] = ()) -> list[str]:
    """What keeps ``state_dict`` from loading into ``model`` strictly, one phrase per kind.

    Args:
        model: the target (DDP / compile / ``NormalizedModel`` wrappers are stripped).
        state_dict: the weights.
        optional: key prefixes of the model that may be missing from ``state_dict`` (a
            classifier re-initialised for fine-tuning).

    Returns:
        ``[]`` when it fits, else phrases such as ``"missing keys [...]"``, ``"unexpected keys
        [...]"`` and ``"shape mismatches ['k: checkpoint (a, b) vs model (c, d)']"``.
    """
    own = unwrap(model).state_dict()
    shapes = [f"{k}: checkpoint {_shape(v)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and _shape(v) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state_dict and not any(k.startswith(o) for o in optional)]
    unexpected = [k for k in state_dict if k not in own]
    parts = []
    if missing:
        parts.append(_listed("missing keys", missing, 10))
    if unexpected:
        parts.append(_listed("unexpected keys", unexpected, 10))
    if shapes:
        parts.append(_listed("shape mismatches", shapes, 5))
    return parts


def check_state_dict_fits(model: nn.Module, state_dict: Mapping[str, Any], *, where: str = "checkpoint") -> None:
    """Raise unless ``state_dict`` loads into ``model`` strictly (same keys, same shapes).

    Checked before anything is loaded, so a file whose spec fits but whose weights were changed
    (or belong to another model) is refused with one message instead of a traceback later.

    Args:
        model: the model built from the checkpoint's spec (wrappers are stripped).
        state_dict: the weights to load (a checkpoint's ``model`` or ``ema``).
        where: the file (or option) named in the message.

    Raises:
        CheckpointError: naming the missing and unexpected keys and the mismatched shapes.
    """
    parts = state_dict_misfit(model, state_dict)
    if parts:
        target = unwrap(model)
        arch = (getattr(target, "pretrained_cfg", None) or {}).get("architecture") or type(target).__name__
        raise CheckpointError(f"{where}: weights do not fit {arch!r} as specified ({'; '.join(parts)}): the "
                              "file's weights were changed or belong to another model; use a checkpoint written "
                              "for this model")
