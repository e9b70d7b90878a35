"""The residual blocks of each architecture advvit trains, in forward order, with their parts.

This module is the one place that knows how the architectures are built; every analysis of a
model's inside (``advvit.analysis.internals``) asks :func:`blocks` instead of reading timm's
attributes itself. Two registries describe a model:

* an *architecture* adapter (``register_architecture``) lists the qualified names of a model
  class's residual blocks in the order its forward runs them, and where each block's output
  holds the class token;
* a *block type* adapter (``register_block_type``) says how one block class is built: its parts
  (attention or other token mixing, MLP or channel part, ...), which forward argument carries
  the residual stream, and whether removing the block leaves the identity.

Supported here: timm's ``VisionTransformer`` (ViT, DeiT, distilled DeiT) with its ``Block``;
``Cait`` with ``LayerScaleBlock`` and the class-attention ``LayerScaleBlockClassAttn``; ``Xcit``
with ``XCABlock`` (cross-covariance attention, local patch interaction, MLP) and its
``ClassAttentionBlock``; ``ResNet`` with ``BasicBlock`` / ``Bottleneck`` (the convolution branch as
one part); advvit's FAN (``advvit.models.fan.FAN``: ``FANBlock``, token self-attention then channel
attention, and XCiT's ``ClassAttentionBlock``; a hybrid's ConvNeXt stages first, their
``ConvNeXtBlock`` s listed as blocks); the conv-mixing ViT (``advvit.models.covit``: a timm
``VisionTransformer`` of ``ConvMixBlock`` s, its token convolution the part ``attn`` as its
attention twin's attention is). A new architecture adds one adapter of each kind below, next to
these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

from torch import nn

from timm.models.cait import Cait, LayerScaleBlock, LayerScaleBlockClassAttn
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import Block as VitBlock
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import ClassAttentionBlock, XCABlock, Xcit

from advvit.models.covit import ConvMixBlock
from advvit.models.fan import FAN, FANBlock, HybridEmbed
from advvit.models import NormalizedModel, unwrap

__all__ = [
    "Part", "BlockLayout", "Block", "BlockRef", "UnsupportedArchitectureError", "blocks",
    "find_block", "eager_model", "register_architecture", "register_block_type",
    "supported_architectures",
]

# The roles a part plays; analyses group lesions and plots by them.
TOKEN_MIXING = "token-mixing"   # attention, class attention, XCA, LPI, token convolution
CHANNEL = "channel"             # the MLP, FAN's channel attention
CONV_BRANCH = "conv-branch"     # a ResNet or ConvNeXt block's whole convolution branch


class UnsupportedArchitectureError(ValueError):
    """The model (or one of its blocks) has no adapter here; the message says which is missing."""


@dataclass(frozen=True)
class Part:
    """One residual branch inside a block.

    Attributes:
        name: what lesions and results call it: ``"attn"`` (attention or other token mixing,
            such as the conv-mixing ViT's token convolution), ``"lpi"`` (XCiT's local patch
            interaction), ``"mlp"`` (MLP / channel part, FAN's channel processing) or ``"conv"``
            (a ResNet or ConvNeXt block's convolution branch).
        role: ``"token-mixing"``, ``"channel"`` or ``"conv-branch"``.
        module: the submodule whose output is the branch's only contribution to the block:
            everything between its output and the residual addition maps zero to zero (layer
            scale, drop path, an SE gate), so replacing that output by zeros removes the part.
    """

    name: str
    role: str
    module: nn.Module


@dataclass(frozen=True)
class BlockLayout:
    """How one block class is built: what a block type adapter returns.

    Attributes:
        kind: a short description, e.g. ``"self-attention"`` or ``"class-attention"``.
        parts: the block's residual branches, in forward order.
        stream_arg: the positional forward argument that carries the residual stream (the block
            maps it to its output; CaiT's class-attention blocks take ``(patch_tokens, cls)``
            and update the class token, argument 1).
        identity_skip: removing the whole block leaves the identity on the stream argument.
            False where the shortcut itself does something (a ResNet block's downsampling
            shortcut and its activation after the addition): removing such a block removes all
            its parts and keeps the shortcut path.
        class_token_update: the block's work is the class token's update alone: its output's
            other tokens are its input's patch tokens carried along, each on its own, never
            mixed (XCiT's and FAN's class-attention blocks). Analyses of what the block does
            to the class token (the Jacobian norms) read the output's class-token rows
            (``Block.class_token``).
    """

    kind: str
    parts: Tuple[Part, ...]
    stream_arg: int = 0
    identity_skip: bool = True
    class_token_update: bool = False


@dataclass(frozen=True)
class Block:
    """A residual block of a model, in forward order.

    Attributes:
        name: the block's qualified module name in the unwrapped model (``"blocks.3"``,
            ``"cls_attn_blocks.0"``, ``"layer2.1"``).
        index: its position among the model's blocks in forward order, from 0.
        module: the block itself.
        layout: its parts and how its residual stream runs (see :class:`BlockLayout`).
        class_token: the index, along the token axis (dim 1) of the block's output, of the class
            token; None where the output has none (CaiT's, XCiT's and FAN's self-attention
            blocks, which run before the class token joins, ViTs pooled without one, ResNets and
            FAN's ConvNeXt blocks).
    """

    name: str
    index: int
    module: nn.Module
    layout: BlockLayout
    class_token: Optional[int] = None

    @property
    def kind(self) -> str:
        return self.layout.kind

    @property
    def parts(self) -> Tuple[Part, ...]:
        return self.layout.parts

    @property
    def part_names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.layout.parts)

    @property
    def lesion_kinds(self) -> Tuple[str, ...]:
        """The lesions that mean something distinct here: each part, and ``"block"`` unless it
        would only repeat the one part: removing a one-branch block removes that branch and
        nothing else (a ResNet block keeps its shortcut, a ConvNeXt block becomes the identity
        either way)."""
        distinct_block = len(self.layout.parts) != 1
        return self.part_names + (("block",) if distinct_block else ())

    def part(self, name: str) -> Part:
        """The part called ``name``.

        Raises:
            KeyError: naming the parts this block has.
        """
        for p in self.layout.parts:
            if p.name == name:
                return p
        raise KeyError(f"block {self.name} ({type(self.module).__name__}) has no part {name!r}; "
                       f"its parts: {list(self.part_names)}")


BlockRef = Union[int, str, Block]

# An architecture adapter: the model -> its blocks' (qualified name, class-token index) in order.
BlockNames = List[Tuple[str, Optional[int]]]
ArchitectureAdapter = Callable[[nn.Module], BlockNames]
# A block type adapter: the block module -> its layout.
BlockTypeAdapter = Callable[[nn.Module], BlockLayout]

_ARCHITECTURES: Dict[type, ArchitectureAdapter] = {}
_BLOCK_TYPES: Dict[type, BlockTypeAdapter] = {}

_F = TypeVar("_F", bound=Callable)


def register_architecture(model_cls: Type[nn.Module]) -> Callable[[_F], _F]:
    """Decorator: register the function listing ``model_cls``'s blocks (subclasses included).

    The function takes the unwrapped model and returns ``[(qualified_name, class_token), ...]`` in
    forward order; ``class_token`` is the index of the class token in that block's output tokens,
    or None.
    """
    def decorate(fn: _F) -> _F:
        _ARCHITECTURES[model_cls] = fn
        return fn
    return decorate


def register_block_type(block_cls: Type[nn.Module]) -> Callable[[_F], _F]:
    """Decorator: register the function giving a ``block_cls`` module's :class:`BlockLayout`."""
    def decorate(fn: _F) -> _F:
        _BLOCK_TYPES[block_cls] = fn
        return fn
    return decorate


def supported_architectures() -> Tuple[str, ...]:
    """The model classes :func:`blocks` knows, by name."""
    return tuple(sorted(cls.__name__ for cls in _ARCHITECTURES))


def _lookup(registry: Dict[type, Callable], obj: object) -> Optional[Callable]:
    # The most specific registered class wins (DeiT's distilled ViT is a VisionTransformer).
    for cls in type(obj).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def blocks(model: nn.Module) -> List[Block]:
    """The residual blocks of ``model`` in forward order, with their parts.

    Args:
        model: a supported timm model, possibly inside ``NormalizedModel``, DDP / DataParallel
            and ``torch.compile`` wrappers (stripped with ``advvit.models.unwrap``).

    Returns:
        One :class:`Block` per residual block, ``index`` 0, 1, ... in the order the forward runs.

    Raises:
        UnsupportedArchitectureError: the model class has no architecture adapter, or one of its
            blocks' classes has no block type adapter; the message names the class and the
            adapter to add.
    """
    inner = unwrap(model)
    list_blocks = _lookup(_ARCHITECTURES, inner)
    if list_blocks is None:
        raise UnsupportedArchitectureError(
            f"advvit.analysis.blocks does not know the residual blocks of {type(inner).__name__} "
            f"({type(inner).__module__}); supported: {', '.join(supported_architectures())}. "
            "Add an adapter with @register_architecture in advvit/analysis/blocks.py")
    found = []
    for index, (name, class_token) in enumerate(list_blocks(inner)):
        module = inner.get_submodule(name)
        describe = _lookup(_BLOCK_TYPES, module)
        if describe is None:
            raise UnsupportedArchitectureError(
                f"{type(inner).__name__}.{name} is a {type(module).__name__} "
                f"({type(module).__module__}), a block type advvit.analysis.blocks does not know "
                f"(known: {', '.join(sorted(c.__name__ for c in _BLOCK_TYPES))}). Add its parts "
                "with @register_block_type in advvit/analysis/blocks.py")
        found.append(Block(name=name, index=index, module=module, layout=describe(module),
                           class_token=class_token))
    if not found:
        raise UnsupportedArchitectureError(f"{type(inner).__name__} has no residual blocks to analyse")
    return found


def find_block(all_blocks: Sequence[Block], ref: BlockRef) -> Block:
    """One block of ``all_blocks`` by index (negative counts from the end), name, or itself.

    Raises:
        KeyError: no such block; the message lists the names.
    """
    if isinstance(ref, Block):
        if any(b.module is ref.module for b in all_blocks):
            return ref
        raise KeyError(f"block {ref.name} is not one of this model's blocks")
    if isinstance(ref, int) and not isinstance(ref, bool):
        if -len(all_blocks) <= ref < len(all_blocks):
            return all_blocks[ref]
        raise KeyError(f"block index {ref} is out of range: the model has {len(all_blocks)} blocks")
    for b in all_blocks:
        if b.name == ref:
            return b
    raise KeyError(f"no block named {ref!r}; the blocks: {[b.name for b in all_blocks]}")


def _strip_runtime_wrappers(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch._dynamo OptimizedModule
        else:
            return model


def eager_model(model: nn.Module) -> nn.Module:
    """The same function as ``model`` without DDP / DataParallel or ``torch.compile`` wrappers.

    The analyses call this: a DDP forward would run collectives, and hooks on the blocks (which
    the analyses and lesions use) are not seen inside a compiled graph. A ``NormalizedModel`` is
    kept, so the result still takes [0, 1] pixels; where a compiled or DDP module sat inside
    one, a new wrapper sharing its modules and normalization buffers is returned.
    """
    outer = _strip_runtime_wrappers(model)
    if not isinstance(outer, NormalizedModel):
        return outer
    inner = eager_model(outer.model)
    if inner is outer.model:
        return outer
    rebuilt = NormalizedModel(inner, *outer.normalization)
    rebuilt.mean, rebuilt.std = outer.mean, outer.std  # the same device and dtype as before
    return rebuilt


# --------------------------------------------------------------------------------------------
# Architectures: the blocks of each model class, in forward order
# --------------------------------------------------------------------------------------------

def _names(prefix: str, seq: Optional[Sequence[nn.Module]], class_token: Optional[int]) -> BlockNames:
    return [(f"{prefix}.{i}", class_token) for i in range(len(seq or ()))]


@register_architecture(VisionTransformer)
def _vision_transformer(model: VisionTransformer) -> BlockNames:
    # Prefix tokens come first: the class token (when there is one) at 0, then distillation /
    # register tokens.
    cls = 0 if getattr(model, "cls_token", None) is not None else None
    return _names("blocks", model.blocks, cls)


@register_architecture(Cait)
def _cait(model: Cait) -> BlockNames:
    # The class token joins only in the class-attention blocks, whose output is that token alone.
    return _names("blocks", model.blocks, None) + _names("blocks_token_only", model.blocks_token_only, 0)


@register_architecture(Xcit)
def _xcit(model: Xcit) -> BlockNames:
    # forward_cls prepends the class token before the class-attention blocks.
    return _names("blocks", model.blocks, None) + _names("cls_attn_blocks", model.cls_attn_blocks, 0)


@register_architecture(ResNet)
def _resnet(model: ResNet) -> BlockNames:
    return [(f"layer{s}.{i}", None) for s in range(1, 5) for i in range(len(getattr(model, f"layer{s}")))]


@register_architecture(FAN)
def _fan(model: FAN) -> BlockNames:
    # Like XCiT: the class token is prepended before the class-attention blocks.
    return (_fan_hybrid_stages(model) + _names("blocks", model.blocks, None)
            + _names("cls_attn_blocks", model.cls_attn_blocks, 0))


def _fan_hybrid_stages(model: FAN) -> BlockNames:
    # A hybrid makes its tokens with ConvNeXt stages inside the patch embedding. Their blocks are
    # residual blocks the forward runs first, on feature maps (no class token), so they are
    # listed as ResNet blocks are; each stage's downsampling (a norm and a strided convolution
    # before its blocks) and the final token projection are not residual blocks.
    if not isinstance(model.patch_embed, HybridEmbed):
        return []
    prefix = "patch_embed.backbone.stages"
    return [(f"{prefix}.{s}.blocks.{i}", None)
            for s, stage in enumerate(model.patch_embed.backbone.stages) for i in range(len(stage.blocks))]


# --------------------------------------------------------------------------------------------
# Block types: the parts of each block class
# --------------------------------------------------------------------------------------------

def _attn_mlp(block: nn.Module, kind: str, stream_arg: int = 0, class_token_update: bool = False) -> BlockLayout:
    return BlockLayout(kind=kind, stream_arg=stream_arg, class_token_update=class_token_update, parts=(
        Part("attn", TOKEN_MIXING, block.attn), Part("mlp", CHANNEL, block.mlp)))


@register_block_type(VitBlock)
def _vit_block(block: VitBlock) -> BlockLayout:
    # x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))): LayerScale and drop path map 0 to 0.
    return _attn_mlp(block, "self-attention")


@register_block_type(ConvMixBlock)
def _conv_mixing_block(block: ConvMixBlock) -> BlockLayout:
    # timm's Block with the multi-head token convolution where attention was (blk.attn): the
    # same part names as its attention twin, so "the token-mixing part" is "attn" in both.
    return _attn_mlp(block, "token-convolution")


@register_block_type(FANBlock)
def _fan_block(block: FANBlock) -> BlockLayout:
    # x + gamma1 * attn(norm1(x)), then x + gamma2 * mlp(norm2(x), H, W) (drop path on both):
    # FAN's "mlp" is its channel processing, a depth-wise-conv MLP gated by channel attention.
    return _attn_mlp(block, "fully-attentional")


@register_block_type(LayerScaleBlock)
def _cait_block(block: LayerScaleBlock) -> BlockLayout:
    return _attn_mlp(block, "self-attention")  # talking-heads attention


@register_block_type(LayerScaleBlockClassAttn)
def _cait_class_attention_block(block: LayerScaleBlockClassAttn) -> BlockLayout:
    # forward(patch_tokens, cls) -> cls: the patch tokens are read, the class token is the stream.
    return _attn_mlp(block, "class-attention", stream_arg=1)


@register_block_type(XCABlock)
def _xca_block(block: XCABlock) -> BlockLayout:
    # timm (like the official code) runs XCA, then LPI, then the MLP, each scaled by a gamma.
    return BlockLayout(kind="cross-covariance-attention", parts=(
        Part("attn", TOKEN_MIXING, block.attn),
        Part("lpi", TOKEN_MIXING, block.local_mp),
        Part("mlp", CHANNEL, block.mlp)))


@register_block_type(ClassAttentionBlock)
def _xcit_class_attention_block(block: ClassAttentionBlock) -> BlockLayout:
    # Zeroing ClassAttn zeroes the class token's update only: timm adds gamma1 * norm1(x) to the
    # patch tokens outside the attention module, and that stays (it is not attention). The
    # patch tokens come out as 2 (x + gamma1 * norm1(x)) (the second residual adds them to
    # themselves), token by token: bookkeeping, not the block's work, hence class_token_update.
    return _attn_mlp(block, "class-attention", class_token_update=True)


def _resnet_layout(block: nn.Module, kind: str, last_bn: nn.Module) -> BlockLayout:
    # The branch ends in its last BatchNorm, then an optional SE gate (x * gate(x): 0 -> 0) and
    # drop path; the shortcut (identity or downsampling) and the activation after the addition
    # are not part of it.
    end = block.se if block.se is not None else last_bn
    return BlockLayout(kind=kind, parts=(Part("conv", CONV_BRANCH, end),), identity_skip=False)


@register_block_type(BasicBlock)
def _basic_block(block: BasicBlock) -> BlockLayout:
    return _resnet_layout(block, "resnet-basic", block.bn2)


@register_block_type(Bottleneck)
def _bottleneck(block: Bottleneck) -> BlockLayout:
    return _resnet_layout(block, "resnet-bottleneck", block.bn3)


@register_block_type(ConvNeXtBlock)
def _convnext_block(block: ConvNeXtBlock) -> BlockLayout:
    # shortcut + drop_path(gamma * mlp(norm(conv_dw(x)))): one branch, ending in the MLP (the
    # layer scale gamma and drop path map 0 to 0). The shortcut is the identity inside a
    # ConvNeXtStage (its downsampling runs before the blocks); a block built with a downsampling
    # shortcut keeps it when removed.
    return BlockLayout(kind="convnext", parts=(Part("conv", CONV_BRANCH, block.mlp),),
                       identity_skip=isinstance(block.shortcut, nn.Identity))
