"""Fine-tuning: a checkpoint of one data set's model loaded into a model for another's.

The classifier, absolute position embeddings, patch-embedding kernel size and input channels are
adapted with timm's own functions; any other misfit raises ``CheckpointError`` before the model
is changed.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from timm.models.cait import Cait

from ..weights import CheckpointError, state_dict_misfit
from ..wrappers import unwrap

__all__ = ["load_finetune_weights"]

_logger = logging.getLogger(__name__)


def _classifier_prefixes(model: nn.Module) -> list:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    return [n + "." for n in names]


def _first_convs(model: nn.Module) -> list:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("first_conv") or []
    return [names] if isinstance(names, str) else list(names)


_FINETUNE_FIX = ("fine-tune from weights of the model's own architecture and width (only the classifier, absolute "
                 "position embeddings, patch-embedding kernel size and input channels are adapted), or build the "
                 "model as the architecture the checkpoint was trained as")


def _adapt(key: str, source: torch.Tensor, target: torch.Tensor, fn: Any) -> torch.Tensor:
    """``fn()``, the adapted ``source``; CheckpointError naming the key and shapes when timm cannot."""
    try:
        return fn()
    except (RuntimeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"load_finetune_weights: {key} cannot be adapted from checkpoint {tuple(source.shape)} "
                              f"to model {tuple(target.shape)} ({e}): {_FINETUNE_FIX}") from None


def load_finetune_weights(model: nn.Module, state_dict: dict, *, keep_classifier: bool = False) -> list:
    """Load a (robust) checkpoint into a model for fine-tuning on another data set.

    The classifier is dropped (the model keeps its freshly initialised head for its own classes),
    absolute position embeddings (ViT / DeiT / CaiT) are resampled to the model's token grid with
    timm's ``resample_abs_pos_embed``, a patch-embedding kernel of another patch size is resampled
    with ``resample_patch_embed``, and an input conv with another channel count is adapted with
    ``adapt_input_conv``. XCiT needs none of this across sizes: its positional encoding is
    computed from the token grid, and its small-input variants share the patch-16 weights.
    Everything is checked before the model is changed.

    Args:
        model: the target model (wrappers are stripped with ``unwrap``).
        state_dict: the source weights (a timm state dict).
        keep_classifier: keep the source classifier when its shape matches the model's.

    Returns:
        The source keys that were dropped.

    Raises:
        CheckpointError: (a ValueError) if keys other than the classifier are missing or left
            over, or shapes differ in ways that cannot be adapted; the message lists the keys and
            shapes and says what fits.
    """
    target = unwrap(model)
    own = target.state_dict()
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    dropped = []
    cls_prefixes = _classifier_prefixes(target)
    for key in list(sd):
        if any(key.startswith(p) for p in cls_prefixes):
            if keep_classifier and key in own and own[key].shape == sd[key].shape:
                continue
            dropped.append(key)
            del sd[key]

    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        grid = getattr(target.patch_embed, "grid_size", None)
        if grid is None:
            raise CheckpointError("load_finetune_weights: pos_embed differs in shape but the model's patch_embed "
                                  f"has no grid_size to resample it to: {_FINETUNE_FIX}")
        prefix = 0 if getattr(target, "no_embed_class", False) or isinstance(target, Cait) else \
            getattr(target, "num_prefix_tokens", 1)
        sd["pos_embed"] = _adapt("pos_embed", sd["pos_embed"], own["pos_embed"], lambda: resample_abs_pos_embed(
            sd["pos_embed"], new_size=list(grid), num_prefix_tokens=prefix))
        _logger.info("resampled pos_embed to a %s token grid", tuple(grid))

    pe_key = "patch_embed.proj.weight"
    if pe_key in sd and pe_key in own and sd[pe_key].shape[-2:] != own[pe_key].shape[-2:]:
        sd[pe_key] = _adapt(pe_key, sd[pe_key], own[pe_key], lambda: resample_patch_embed(
            sd[pe_key], list(own[pe_key].shape[-2:])))
        _logger.info("resampled %s to kernel %s", pe_key, tuple(own[pe_key].shape[-2:]))

    for conv in _first_convs(target):
        key = conv + ".weight"
        if key in sd and key in own and sd[key].shape[1] != own[key].shape[1]:
            source_chans = sd[key].shape[1]
            sd[key] = _adapt(key, sd[key], own[key], lambda: adapt_input_conv(own[key].shape[1], sd[key]))
            _logger.info("adapted %s from %d to %d input channels", key, source_chans, own[key].shape[1])

    misfit = state_dict_misfit(target, sd, optional=cls_prefixes)
    if misfit:
        raise CheckpointError("load_finetune_weights: the checkpoint's weights cannot be adapted to the model "
                              f"({'; '.join(misfit)}): {_FINETUNE_FIX}")
    target.load_state_dict(sd, strict=False)  # only the dropped classifier is missing
    return dropped
