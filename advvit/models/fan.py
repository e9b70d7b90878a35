"""FAN: Fully Attentional Networks (Zhou et al., "Understanding The Robustness in Vision Transformers").

Importing this module (``import advvit.models`` does) registers in timm the FAN-ViT and FAN-Hybrid
image classifiers under the names of the public NVlabs/FAN code, so the released checkpoints load
by name and key:

* ``fan_{tiny_12,small_12,base_18,large_24}_p16_224``: width 192 / 384 / 448 / 480, depth 12 / 12 /
  18 / 24, heads 4 / 8 / 8 / 10, XCiT's convolutional patch embedding (16x16 patches).
* ``fan_{tiny_8,small_12,base_16,large_16}_p4_hybrid``: the same token blocks (8 / 10 / 16 / 22 of
  them; the names' depths are the public code's) on the first two ConvNeXt stages (depths 3-3, or
  3-5 for large; widths 128, 256), whose stride-8 map a 2x2 stride-2 convolution turns into tokens.
* ``fan_*_p4_32`` / ``fan_tiny_12_p8_32`` and ``fan_*_p4_hybrid_32``: the same networks for 32x32
  inputs (CIFAR, Fashion-MNIST), 8x8 (p4) or 4x4 (p8) tokens. The ViT ones set the stride of the
  first patch convolutions to 1, the hybrid ones the stride of the ConvNeXt stem to 1 ('same'
  padding), so every weight keeps its shape and a released 224 checkpoint loads into them.

A FAN block is token self-attention, then "channel processing" in place of the MLP: an MLP whose
hidden layer adds a depth-wise convolution branch over the token grid, gated per channel by an
attention over channels computed from the block's input; LayerScale (``gamma1`` / ``gamma2``) and
drop path on both branches. Fourier positional encoding, the patch embedding and the two final
class-attention blocks are XCiT's, taken from timm.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXtStage
from timm.models.xcit import ClassAttentionBlock, ConvPatchEmbed, PositionalEncodingFourier
from timm.models.xcit import checkpoint_filter_fn as _xcit_filter_fn

__all__ = ["FAN", "REGISTERED", "set_patch_stride"]

ImgSize = Union[int, Tuple[int, int]]
_STEM_PATCH = 16  # the released checkpoints' patch embedding: four 3x3 stride-2 convolutions


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class TokenMixing(nn.Module):
    """Multi-head self-attention over tokens, with separate ``q`` and ``kv`` projections (FAN's names)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"FAN: embed_dim={dim} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1))
            x = attn @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class DWConv(nn.Module):
    """Two 3x3 depth-wise convolutions over the token grid (GELU and BatchNorm between them)."""

    def __init__(self, dim: int, kernel_size: int = 3, act_layer: Callable = nn.GELU,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, **dd)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, **dd)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(B, C, N).transpose(1, 2)


class ConvMlp(nn.Module):
    """FAN's MLP: ``fc2(h + gamma * dwconv(h))`` with ``h = fc1(x)``.

    There is no activation after ``fc1``: the non-linearity is the GELU inside the depth-wise
    branch, as in the released models (their weights depend on it).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0., device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.dwconv = DWConv(hidden_dim, **dd)
        self.gamma = nn.Parameter(torch.ones(hidden_dim, **dd))
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)
        x = x + self.drop(self.gamma * self.dwconv(x, H, W))
        return self.drop(self.fc2(x))


class ChannelProcessing(nn.Module):
    """FAN's channel attention: ``norm_v(mlp_v(x))`` gated by a sigmoid attention over channels.

    Per head, the queries (a projection of x) and keys (x itself) are softmax-normalized over the
    tokens; each channel's gate is ``sigmoid(<q_channel, mean over channels of k>) * temperature``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, qkv_bias: bool = True,
                 attn_drop: float = 0., drop: float = 0., device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1, **dd))
        self.mlp_v = ConvMlp(dim, mlp_hidden_dim, drop=drop, **dd)
        # nn.LayerNorm's default eps (1e-5), not the blocks' 1e-6: the released weights saw this one.
        self.norm_v = nn.LayerNorm(dim, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate, shape (B, 1, C)."""
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).permute(0, 2, 3, 1).softmax(dim=-1)  # B h c N
        k = x.reshape(B, N, h, C // h).transpose(1, 2).softmax(dim=-2).mean(dim=-1, keepdim=True)  # B h N 1
        attn = torch.sigmoid(q @ k) * self.temperature  # B h c 1
        return self.attn_drop(attn).reshape(B, 1, C)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.norm_v(self.mlp_v(x, H, W)) * self.channel_attention(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"temperature"}


class FANBlock(nn.Module):
    """Token self-attention, then channel processing; LayerScale and drop path on both."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0., eta: float = 1.,
                 norm_layer: Callable = nn.LayerNorm, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = TokenMixing(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ChannelProcessing(dim, num_heads, int(dim * mlp_ratio), qkv_bias=qkv_bias,
                                     attn_drop=attn_drop, drop=drop, **dd)
        # Plain parameters, not timm's LayerScale: the released checkpoints name them gamma1/gamma2.
        self.gamma1 = nn.Parameter(eta * torch.ones(dim, **dd))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim, **dd))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), H, W))


class ConvNeXtStem(nn.Module):
    """The hybrids' CNN: a ConvNeXt patchify stem and its first stages (timm's ConvNeXtStage).

    ``stem_stride`` 4 is ConvNeXt's; 1 keeps the 4x4 kernel (and so the weights) with 'same'
    padding, for small inputs.

    Normalization is timm's ``LayerNorm2d`` (the biased variance throughout). The public code's own
    ConvNeXt copy switches to an unbiased variance on channels-last-strided inputs, which its
    blocks receive; with the same weights its features differ from these by a factor of about
    ``sqrt(1 - 1/C)`` in the normalized activations (C = 128 or 256 channels).
    """

    def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int], stem_stride: int = 4,
                 ls_init_value: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if stem_stride not in (1, 4):
            raise ValueError(f"FAN hybrid: stem_stride must be 4 (ConvNeXt) or 1 (small inputs), got {stem_stride}")
        # 'same' for the even 4x4 kernel at stride 1: one pixel before, two after (as padding='same').
        self.stem_pad = (1, 2, 1, 2) if stem_stride == 1 else None
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=stem_stride, **dd),
            LayerNorm2d(dims[0], **dd))
        norm = partial(LayerNorm2d, eps=1e-6)
        self.stages = nn.Sequential(*[
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], stride=2 if i else 1, depth=d,
                          ls_init_value=ls_init_value, conv_mlp=True, norm_layer=norm, **dd)
            for i, d in enumerate(depths)])
        self.num_features = dims[len(depths) - 1]
        self.reduction = stem_stride * 2 ** (len(depths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem_pad is not None:
            x = F.pad(x, self.stem_pad)
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """Tokens from a CNN's feature map: a ``patch_size`` x ``patch_size`` strided convolution."""

    def __init__(self, backbone: ConvNeXtStem, img_size: ImgSize, embed_dim: int, patch_size: int = 2,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, kernel_size=patch_size, stride=patch_size,
                              device=device, dtype=dtype)
        self.img_size = to_2tuple(img_size)
        self.patch_size = backbone.reduction * patch_size
        self.grid_size = tuple(s // self.patch_size for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(self.backbone(x))
        Hp, Wp = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (Hp, Wp)


def _patch_convs(patch_embed: ConvPatchEmbed) -> list:
    return [m[0] for m in patch_embed.proj if isinstance(m, nn.Sequential)]


def set_patch_stride(patch_embed: ConvPatchEmbed, patch_size: int, img_size: ImgSize) -> ConvPatchEmbed:
    """Reach an effective ``patch_size`` with XCiT's patch-16 stack by setting its first strides to 1.

    No weight changes shape, so checkpoints of the patch-16 model load unchanged.

    Raises:
        ValueError: ``patch_size`` is not a power of two in [1, 16].
    """
    convs = _patch_convs(patch_embed)
    full = 2 ** len(convs)
    if patch_size < 1 or patch_size > full or patch_size & (patch_size - 1):
        raise ValueError(f"FAN: patch_size={patch_size} is not reachable from the patch-{full} embedding: "
                         f"use a power of two between 1 and {full}")
    num_stride_one = len(convs) - patch_size.bit_length() + 1
    for i, conv in enumerate(convs):
        conv.stride = (1, 1) if i < num_stride_one else (2, 2)
    size = to_2tuple(img_size)
    grid = list(size)
    for conv in convs:
        grid = [(g - 1) // conv.stride[0] + 1 for g in grid]  # 3x3, padding 1
    patch_embed.patch_size = patch_size
    patch_embed.img_size = tuple(size)
    patch_embed.grid_size = tuple(grid)
    patch_embed.num_patches = grid[0] * grid[1]
    return patch_embed


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

class FAN(nn.Module):
    """Fully Attentional Network: FAN blocks over tokens, two class-attention blocks, a linear head.

    Args:
        img_size: input size (recorded; the token grid is taken from each input).
        patch_size: effective patch size of the convolutional patch embedding (power of two <= 16).
        in_chans: input channels.
        num_classes: classifier outputs (0: no head).
        global_pool: 'token' (the class token, as published) or 'avg' (mean of the patch tokens).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the token blocks.
        drop_rate: dropout after projections; attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, the same rate in every block (as in the public code).
        cls_attn_layers: class-attention blocks; eta: LayerScale init; tokens_norm: class-attention
            blocks normalize all tokens (True) or only the class token.
        hybrid_depths, hybrid_dims, hybrid_stem_stride: when depths are given, tokens come from
            these ConvNeXt stages instead of the patch embedding (``patch_size`` is then unused).
        head_init_scale: scale of the initial classifier weights.
    """

    def __init__(self, img_size: ImgSize = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dim: int = 384, depth: int = 12, num_heads: int = 8,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., cls_attn_layers: int = 2, eta: float = 1., tokens_norm: bool = True,
                 hybrid_depths: Optional[Sequence[int]] = None, hybrid_dims: Sequence[int] = (128, 256),
                 hybrid_stem_stride: int = 4, head_init_scale: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"FAN: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        if hybrid_depths:
            backbone = ConvNeXtStem(in_chans, hybrid_depths, hybrid_dims, stem_stride=hybrid_stem_stride, **dd)
            self.patch_embed = HybridEmbed(backbone, img_size, embed_dim, **dd)
        else:
            # Built at patch 16 (the released stem), then strides set for the patch size asked for.
            self.patch_embed = ConvPatchEmbed(img_size=img_size, patch_size=_STEM_PATCH, in_chans=in_chans,
                                              embed_dim=embed_dim, **dd)
            set_patch_stride(self.patch_embed, patch_size, img_size)
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            FANBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                     attn_drop=attn_drop_rate, drop_path=drop_path_rate, eta=eta, norm_layer=norm_layer, **dd)
            for _ in range(depth)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                                attn_drop=attn_drop_rate, norm_layer=norm_layer, eta=eta, tokens_norm=tokens_norm,
                                **dd)
            for _ in range(cls_attn_layers)])
        self.norm = norm_layer(embed_dim, **dd)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.patch_size
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"blocks.{i}")
                             for i in range(depth)]
        self._init(head_init_scale)

    def _init(self, head_init_scale: float) -> None:
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=r"^blocks\.(\d+)",
                    cls_attn_blocks=[(r"^cls_attn_blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"FAN: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        self.head = (nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
                     if num_classes > 0 else nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized tokens, class token first: (B, 1 + H*W, embed_dim)."""
        B = x.shape[0]
        x, (H, W) = self.patch_embed(x)
        pos = self.pos_embed(B, H, W).reshape(B, -1, x.shape[1]).transpose(1, 2)
        x = self.pos_drop(x + pos.to(x.dtype))
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, H, W, use_reentrant=False)
            else:
                x = blk(x, H, W)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, DWConv):
        for conv in (m.conv1, m.conv2):  # fan-out normal, as the released models were initialised
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            nn.init.normal_(conv.weight, 0., (2.0 / fan_out) ** 0.5)
            nn.init.zeros_(conv.bias)
    elif isinstance(m, ConvNeXtStem):
        for conv in m.modules():
            if isinstance(conv, nn.Conv2d):
                trunc_normal_(conv.weight, std=.02)
                nn.init.zeros_(conv.bias)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: FAN) -> Dict[str, torch.Tensor]:
    """Released FAN checkpoints -> this model: unwrap the training-script container, then XCiT's
    remapping (FAN's public code does the same: ``pos_embeder.`` -> ``pos_embed.``, a fused
    class-attention ``qkv`` split into ``q``, ``k``, ``v``)."""
    for key in ("state_dict_ema", "state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    return _xcit_filter_fn(dict(state_dict), model)


# --------------------------------------------------------------------------------------------
# Registered variants
# --------------------------------------------------------------------------------------------

def _cfg(**kwargs: Any) -> Dict[str, Any]:
    cfg = {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0.0", "classifier": "head",
        "license": "other",  # the released weights: NVIDIA Source Code License-NC
        "paper_ids": "arXiv:2204.12451",
    }
    cfg.update(kwargs)
    return cfg


_HYBRID_CONV = "patch_embed.backbone.stem.0"
_SMALL = dict(input_size=(3, 32, 32))

# width, depth, heads of the FAN-ViT models; depth, width, heads, ConvNeXt depths of the hybrids.
_VIT = {"nano_12": (128, 12, 4), "tiny_12": (192, 12, 4), "small_12": (384, 12, 8), "base_18": (448, 18, 8), "large_24": (480, 24, 10)}
_HYBRID = {"tiny_8": (192, 8, 8, (3, 3)), "small_12": (384, 10, 8, (3, 3)),
           "base_16": (448, 16, 8, (3, 3)), "large_16": (480, 22, 10, (3, 5))}

default_cfgs = generate_default_cfgs({
    **{f"fan_{n}_p16_224": _cfg() for n in _VIT if n != "nano_12"},
    **{f"fan_{n}_p4_32": _cfg(**_SMALL) for n in _VIT if n != "nano_12"},
    "fan_tiny_12_p8_32": _cfg(**_SMALL),
    "fan_nano_12_p8_32": _cfg(**_SMALL),
    **{f"fan_{n}_p4_hybrid": _cfg(first_conv=_HYBRID_CONV) for n in _HYBRID},
    **{f"fan_{n}_p4_hybrid_32": _cfg(first_conv=_HYBRID_CONV, **_SMALL) for n in _HYBRID},
})
REGISTERED = tuple(default_cfgs)


def _create_fan(variant: str, pretrained: bool, **kwargs: Any) -> FAN:
    return build_model_with_cfg(FAN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _vit(variant: str, size: str, pretrained: bool, patch_size: int, img_size: int, kwargs: dict) -> FAN:
    dim, depth, heads = _VIT[size]
    args = dict(patch_size=patch_size, img_size=img_size, embed_dim=dim, depth=depth, num_heads=heads)
    return _create_fan(variant, pretrained, **dict(args, **kwargs))


def _hybrid(variant: str, size: str, pretrained: bool, stem_stride: int, img_size: int, kwargs: dict) -> FAN:
    dim, depth, heads, cnn_depths = _HYBRID[size]
    args = dict(img_size=img_size, embed_dim=dim, depth=depth, num_heads=heads, hybrid_depths=cnn_depths,
                hybrid_stem_stride=stem_stride)
    if size == "large_16":
        args["head_init_scale"] = 0.001  # the public code's large hybrid starts from a near-zero head
    return _create_fan(variant, pretrained, **dict(args, **kwargs))


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-T-ViT: width 192, 12 blocks, 4 heads.

    7.32M parameters, as the public code's model; the paper gives 7.3M.
    """
    return _vit("fan_tiny_12_p16_224", "tiny_12", pretrained, 16, 224, kwargs)


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-S-ViT: width 384, 12 blocks, 8 heads.

    28.35M parameters, as the public code's model; the paper gives 28.0M.
    """
    return _vit("fan_small_12_p16_224", "small_12", pretrained, 16, 224, kwargs)


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-B-ViT: width 448, 18 blocks, 8 heads.

    54.35M parameters, as the public code's model; the paper gives 54.0M.
    """
    return _vit("fan_base_18_p16_224", "base_18", pretrained, 16, 224, kwargs)


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-L-ViT: width 480, 24 blocks, 10 heads.

    80.57M parameters, as the public code's model; the paper gives 80.5M.
    """
    return _vit("fan_large_24_p16_224", "large_24", pretrained, 16, 224, kwargs)


@register_model
def fan_tiny_12_p4_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-T-ViT at 32x32, 8x8 tokens; loads ``fan_tiny_12_p16_224`` weights unchanged."""
    return _vit("fan_tiny_12_p4_32", "tiny_12", pretrained, 4, 32, kwargs)


@register_model
def fan_tiny_12_p8_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-T-ViT at 32x32, 4x4 tokens (the quick CPU model); loads ``fan_tiny_12_p16_224`` weights."""
    return _vit("fan_tiny_12_p8_32", "tiny_12", pretrained, 8, 32, kwargs)


@register_model
def fan_nano_12_p8_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-ViT with XCiT-N12's width, depth and heads (128, 12, 4) at 32x32, 4x4 tokens: the
    FAN of the architecture comparisons at XCiT-N12's size (no published weights)."""
    return _vit("fan_nano_12_p8_32", "nano_12", pretrained, 8, 32, kwargs)


@register_model
def fan_small_12_p4_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-S-ViT at 32x32, 8x8 tokens; loads ``fan_small_12_p16_224`` weights unchanged."""
    return _vit("fan_small_12_p4_32", "small_12", pretrained, 4, 32, kwargs)


@register_model
def fan_base_18_p4_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-B-ViT at 32x32, 8x8 tokens; loads ``fan_base_18_p16_224`` weights unchanged."""
    return _vit("fan_base_18_p4_32", "base_18", pretrained, 4, 32, kwargs)


@register_model
def fan_large_24_p4_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-L-ViT at 32x32, 8x8 tokens; loads ``fan_large_24_p16_224`` weights unchanged."""
    return _vit("fan_large_24_p4_32", "large_24", pretrained, 4, 32, kwargs)


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-T-Hybrid: ConvNeXt stages 3-3, then 8 FAN blocks of width 192, 8 heads.

    7.47M parameters, as the public code's model; the paper gives 7.4M.
    """
    return _hybrid("fan_tiny_8_p4_hybrid", "tiny_8", pretrained, 4, 224, kwargs)


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-S-Hybrid: ConvNeXt stages 3-3, then 10 FAN blocks of width 384, 8 heads.

    26.12M parameters, as the public code's model; the paper gives 26.3M.
    """
    return _hybrid("fan_small_12_p4_hybrid", "small_12", pretrained, 4, 224, kwargs)


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-B-Hybrid: ConvNeXt stages 3-3, then 16 FAN blocks of width 448, 8 heads.

    50.48M parameters, as the public code's model; the paper gives 50.4M.
    """
    return _hybrid("fan_base_16_p4_hybrid", "base_16", pretrained, 4, 224, kwargs)


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-L-Hybrid: ConvNeXt stages 3-5, then 22 FAN blocks of width 480, 10 heads.

    76.86M parameters, as the public code's model; the paper gives 76.8M.
    """
    return _hybrid("fan_large_16_p4_hybrid", "large_16", pretrained, 4, 224, kwargs)


@register_model
def fan_tiny_8_p4_hybrid_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-T-Hybrid at 32x32 (stride-1 stem, 8x8 tokens); loads ``fan_tiny_8_p4_hybrid`` weights."""
    return _hybrid("fan_tiny_8_p4_hybrid_32", "tiny_8", pretrained, 1, 32, kwargs)


@register_model
def fan_small_12_p4_hybrid_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-S-Hybrid at 32x32 (stride-1 stem, 8x8 tokens); loads ``fan_small_12_p4_hybrid`` weights."""
    return _hybrid("fan_small_12_p4_hybrid_32", "small_12", pretrained, 1, 32, kwargs)


@register_model
def fan_base_16_p4_hybrid_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-B-Hybrid at 32x32 (stride-1 stem, 8x8 tokens); loads ``fan_base_16_p4_hybrid`` weights."""
    return _hybrid("fan_base_16_p4_hybrid_32", "base_16", pretrained, 1, 32, kwargs)


@register_model
def fan_large_16_p4_hybrid_32(pretrained: bool = False, **kwargs: Any) -> FAN:
    """FAN-L-Hybrid at 32x32 (stride-1 stem, 8x8 tokens); loads ``fan_large_16_p4_hybrid`` weights."""
    return _hybrid("fan_large_16_p4_hybrid_32", "large_16", pretrained, 1, 32, kwargs)
