"""The convolution-mixing ViT ("CoViT") and its attention twin (Wang & Ruan, "Understanding Adversarial
Robustness of Vision Transformers via Cauchy Problem", TrustAI/ODE4RobustViT).

CoViT is a plain pre-norm ViT whose multi-head self-attention is replaced by a multi-head 1-D
convolution over the token sequence: the channels are split into heads, each head is convolved
along the sequence (class token first, then the patches in raster order) with its own kernel size
and 'same' padding, and a linear projection mixes the heads, where attention has its output
projection. Heads are as many as kernel sizes; the public code's default is four heads of kernel 3.
The head is the mean of all tokens (class token included), LayerNorm, linear.

Both are timm ``VisionTransformer``s, built the same way and as the public code builds its
models: LayerNorm with PyTorch's default eps 1e-5 (timm's ViT default is 1e-6), class token and
position embedding drawn from N(0, 1) and every layer with PyTorch's default initialisation
(timm's ViT draws Linear weights from a truncated normal of std 0.02 with zero biases, the
position embedding with std 0.02, the class token with std 1e-6). So the two differ only in the
token mixer: ``covit_d{D}_e{E}_*`` (convolution) and ``vit_d{D}_e{E}_*`` (attention), depth D in 1-12,
width E in 128 / 256 / 512, four heads, learned position embeddings, patch 16 at 224x224
(``*_p16_224``, the paper's setting) or patch 4 at 32x32 (``*_p4_32``). "Attention vs convolution"
is the ``model:`` key of a config. At equal shape the attention twin has ``2.25 E^2 + 2 E`` more
parameters per block (q, k, v: ``3 E^2 + 3 E``, against four E/4-channel kernels of size 3:
``0.75 E^2 + E``).

Other kernel sizes: ``timm.create_model("covit_d4_e128_p4_32", kernel_sizes=(1, 3, 5, 7))`` (one
per head, every block) or a sequence of such tuples, one per block.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter_fn

__all__ = ["TokenConv1d", "ConvMixBlock", "per_layer_kernel_sizes", "REGISTERED", "DEPTHS", "WIDTHS",
           "DEFAULT_KERNEL_SIZES", "LAYER_NORM_EPS"]

KernelSizes = Union[Sequence[int], Sequence[Sequence[int]]]

DEPTHS = tuple(range(1, 13))
WIDTHS = (128, 256, 512)
NUM_HEADS = 4
DEFAULT_KERNEL_SIZES = (3, 3, 3, 3)  # the public code's default kernel_size_group: 4 heads of kernel 3
LAYER_NORM_EPS = 1e-5  # the public code's nn.LayerNorm default


class TokenConv1d(nn.Module):
    """Multi-head 1-D convolution along the token sequence, then a linear projection.

    Sits where timm's ``Block`` has its attention (``blk.attn``), with the same call signature.

    Args:
        dim: token width; split evenly over the heads.
        kernel_sizes: one kernel size per head (stride 1, 'same' padding).
        proj_bias: bias of the output projection.
        proj_drop: dropout after the projection.
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int], proj_bias: bool = True, proj_drop: float = 0.,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if not kernel_sizes or any(k < 1 for k in kernel_sizes) or dim % len(kernel_sizes):
            raise ValueError(f"CoViT: kernel_sizes={kernel_sizes} must be positive, one per head, and their "
                             f"number must divide the width {dim}")
        self.kernel_sizes = kernel_sizes
        self.head_dim = dim // len(kernel_sizes)
        self.convs = nn.ModuleList([
            nn.Conv1d(self.head_dim, self.head_dim, k, padding="same", **dd) for k in kernel_sizes])
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("TokenConv1d mixes neighbouring tokens by convolution: it takes no attention mask")
        heads = x.transpose(1, 2).split(self.head_dim, dim=1)  # (B, head_dim, N) each
        x = torch.cat([conv(h) for conv, h in zip(self.convs, heads)], dim=1).transpose(1, 2)
        return self.proj_drop(self.proj(x))


class ConvMixBlock(Block):
    """timm's pre-norm ``Block`` with ``TokenConv1d`` as its token mixer.

    Args:
        kernel_sizes: per-layer kernel sizes (one tuple per block); block ``depth`` takes its own.
        depth: this block's index (timm's VisionTransformer passes it).
        **kwargs: timm ``Block`` arguments (``num_heads`` must equal the number of kernel sizes).
    """

    def __init__(self, dim: int, num_heads: int, *, kernel_sizes: Sequence[Sequence[int]], depth: int = 0,
                 proj_bias: bool = True, proj_drop: float = 0., attn_layer: Any = None, device=None, dtype=None,
                 **kwargs: Any) -> None:
        del attn_layer  # VisionTransformer passes its attention class; this block mixes by convolution
        super().__init__(dim, num_heads, proj_bias=proj_bias, proj_drop=proj_drop, depth=depth,
                         attn_layer=_NoMixer, device=device, dtype=dtype, **kwargs)
        ks = kernel_sizes[depth]
        if len(ks) != num_heads:
            raise ValueError(f"CoViT block {depth}: {len(ks)} kernel sizes {tuple(ks)} for num_heads={num_heads}: "
                             "give one kernel size per head")
        self.attn = TokenConv1d(dim, ks, proj_bias=proj_bias, proj_drop=proj_drop, device=device, dtype=dtype)


class _NoMixer(nn.Module):
    """Placeholder that timm's ``Block`` builds as its attention; ``ConvMixBlock`` replaces it."""

    def __init__(self, dim: int, **_: Any) -> None:
        super().__init__()


def per_layer_kernel_sizes(kernel_sizes: KernelSizes, depth: int) -> Tuple[Tuple[int, ...], ...]:
    """One tuple of per-head kernel sizes per block, from one tuple (shared) or one per block.

    Raises:
        ValueError: a per-block list whose length is not ``depth``.
    """
    ks = list(kernel_sizes)
    if ks and all(isinstance(k, int) for k in ks):
        return (tuple(ks),) * depth
    if len(ks) != depth:
        raise ValueError(f"CoViT: kernel_sizes has {len(ks)} per-block entries for depth={depth}: "
                         "give one tuple of per-head sizes, or one per block")
    return tuple(tuple(int(k) for k in layer) for layer in ks)


# --------------------------------------------------------------------------------------------
# Registered variants
# --------------------------------------------------------------------------------------------

def _cfg(img_size: int, **kwargs: Any) -> Dict[str, Any]:
    cfg = {
        "url": "", "num_classes": 1000, "input_size": (3, img_size, img_size), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2208.00906",
    }
    cfg.update(kwargs)
    return cfg


_SIZES = {"p16_224": (16, 224), "p4_32": (4, 32)}  # name suffix -> (patch, image size)


def _variants() -> Dict[str, Tuple[bool, int, int, int, int]]:
    """name -> (convolution mixer?, depth, width, patch, image size)."""
    return {f"{family}_d{d}_e{e}_{suffix}": (family == "covit", d, e, patch, img)
            for family in ("covit", "vit") for suffix, (patch, img) in _SIZES.items()
            for e in WIDTHS for d in DEPTHS}


_VARIANTS = _variants()
default_cfgs = generate_default_cfgs({name: _cfg(v[4]) for name, v in _VARIANTS.items()})
REGISTERED = tuple(default_cfgs)


def _create(variant: str, pretrained: bool, *, conv: bool, depth: int, width: int, patch: int, img: int,
            kwargs: Dict[str, Any]) -> VisionTransformer:
    # weight_init="reset" keeps every layer's own (PyTorch default) initialisation; only the
    # class token and the position embedding are drawn by timm, and are redrawn below.
    args = dict(patch_size=patch, img_size=img, embed_dim=width, depth=depth, num_heads=NUM_HEADS,
                class_token=True, global_pool="avg", pool_include_prefix=True,
                norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS), weight_init="reset")
    args.update(kwargs)
    kernel_sizes = args.pop("kernel_sizes", None)
    if conv:
        table = per_layer_kernel_sizes(kernel_sizes or DEFAULT_KERNEL_SIZES, args["depth"])
        args["block_fn"] = partial(ConvMixBlock, kernel_sizes=table)
    elif kernel_sizes is not None:
        raise ValueError(f"{variant} is the attention twin: kernel_sizes is a covit_* argument")
    model = build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=_vit_filter_fn,
                                 **args)
    if not pretrained:  # (pretrained weights, as an exported model's, are loaded by now)
        with torch.no_grad():  # the public code's torch.randn parameters
            nn.init.normal_(model.cls_token, std=1.0)
            nn.init.normal_(model.pos_embed, std=1.0)
    return model


def _entrypoint(name: str) -> Callable[..., VisionTransformer]:
    conv, depth, width, patch, img = _VARIANTS[name]

    def fn(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return _create(name, pretrained, conv=conv, depth=depth, width=width, patch=patch, img=img, kwargs=kwargs)

    mixer = "multi-head 1-D convolution (kernel 3 per head)" if conv else "multi-head self-attention"
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = (f"{'CoViT' if conv else 'ViT'}: {depth} blocks of width {width}, {NUM_HEADS} heads of {mixer}, "
                  f"patch {patch} at {img}x{img}, mean-pooled head.")
    return fn


for _name in REGISTERED:
    globals()[_name] = register_model(_entrypoint(_name))
