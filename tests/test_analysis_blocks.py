"""advvit.analysis.blocks: each architecture's residual blocks, in forward order, with their parts."""
from functools import partial

import pytest
import torch
from torch import nn

import advvit  # noqa: F401  (before timm: the torchvision guard)
import advvit.models  # noqa: F401  (registers the thesis variants)
import timm
from timm.models.cait import Cait
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import Attention, ResPostBlock, VisionTransformer
from timm.models.xcit import Xcit

from advvit.analysis.blocks import (
    _ARCHITECTURES, _BLOCK_TYPES, CHANNEL, CONV_BRANCH, TOKEN_MIXING, BlockLayout, Part,
    UnsupportedArchitectureError, blocks, eager_model, find_block, register_architecture,
    register_block_type, supported_architectures)
from advvit.analysis.internals import lesion
from advvit.models.covit import ConvMixBlock, TokenConv1d
from advvit.models.fan import FAN
from advvit.models import NormalizedModel


def vit(**kw):
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5, **kw)


def cait():
    return Cait(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, depth_token_only=2, num_classes=5)


def xcit():
    return Xcit(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, cls_attn_layers=2, num_classes=5)


def resnet(block=BasicBlock):
    return ResNet(block=block, layers=(2, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8, num_classes=5)


def fan(**kw):
    return FAN(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, cls_attn_layers=2, num_classes=5, **kw)


def fan_hybrid():
    # ConvNeXt stages of 2 and 1 blocks (stride-1 stem: 16x16, then 8x8 maps), 4x4 tokens.
    return fan(hybrid_depths=(2, 1), hybrid_dims=(4, 8), hybrid_stem_stride=1)


def covit(conv=True):
    """The conv-mixing ViT (per-block kernel sizes) or its attention twin, built as advvit.models.covit does."""
    block = dict(block_fn=partial(ConvMixBlock, kernel_sizes=((3, 5), (1, 3)))) if conv else {}
    return vit(class_token=True, global_pool="avg", pool_include_prefix=True, **block)


TINY = {
    "vit": vit,
    "deit-distilled": lambda: VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=16, depth=2,
                                                         num_heads=2, num_classes=5),
    "cait": cait,
    "xcit": xcit,
    "resnet-basic": resnet,
    "resnet-bottleneck": lambda: resnet(Bottleneck),
    "fan": fan,
    "fan-hybrid": fan_hybrid,
    "covit": covit,
    "covit-attention-twin": lambda: covit(conv=False),
}


def forward_order(model, x):
    """The order in which the model's forward actually runs the listed blocks."""
    found = blocks(model)
    ran = []
    handles = [b.module.register_forward_hook(lambda m, a, o, name=b.name: ran.append(name)) for b in found]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return ran


@pytest.mark.parametrize("arch", sorted(TINY))
def test_blocks_are_listed_in_forward_order(arch):
    model = TINY[arch]()
    found = blocks(model)
    assert [b.index for b in found] == list(range(len(found)))
    assert forward_order(model, torch.rand(2, 3, 16, 16)) == [b.name for b in found]


def test_each_architecture_names_its_blocks_and_parts():
    names = lambda m: [(b.name, b.kind, b.part_names, b.class_token) for b in blocks(m)]  # noqa: E731
    assert names(vit()) == [(f"blocks.{i}", "self-attention", ("attn", "mlp"), 0) for i in range(2)]
    assert names(vit(class_token=False, global_pool="avg"))[0][3] is None
    assert names(cait()) == [
        ("blocks.0", "self-attention", ("attn", "mlp"), None), ("blocks.1", "self-attention", ("attn", "mlp"), None),
        ("blocks_token_only.0", "class-attention", ("attn", "mlp"), 0),
        ("blocks_token_only.1", "class-attention", ("attn", "mlp"), 0)]
    assert names(xcit()) == [
        ("blocks.0", "cross-covariance-attention", ("attn", "lpi", "mlp"), None),
        ("blocks.1", "cross-covariance-attention", ("attn", "lpi", "mlp"), None),
        ("cls_attn_blocks.0", "class-attention", ("attn", "mlp"), 0),
        ("cls_attn_blocks.1", "class-attention", ("attn", "mlp"), 0)]
    assert names(resnet()) == [(n, "resnet-basic", ("conv",), None)
                               for n in ("layer1.0", "layer1.1", "layer2.0", "layer3.0", "layer4.0")]
    assert names(resnet(Bottleneck))[0][1] == "resnet-bottleneck"
    fan_blocks = [(f"blocks.{i}", "fully-attentional", ("attn", "mlp"), None) for i in range(2)] + [
        (f"cls_attn_blocks.{i}", "class-attention", ("attn", "mlp"), 0) for i in range(2)]
    assert names(fan()) == fan_blocks
    # The hybrid's ConvNeXt blocks come first: residual blocks on feature maps, one branch each.
    stages = "patch_embed.backbone.stages"
    assert names(fan_hybrid()) == [(f"{stages}.{s}.blocks.{i}", "convnext", ("conv",), None)
                                   for s, i in ((0, 0), (0, 1), (1, 0))] + fan_blocks
    assert names(covit()) == [(f"blocks.{i}", "token-convolution", ("attn", "mlp"), 0) for i in range(2)]
    assert names(covit(conv=False)) == [(f"blocks.{i}", "self-attention", ("attn", "mlp"), 0) for i in range(2)]


def test_parts_are_the_branch_modules():
    x, c, r = blocks(xcit())[0], blocks(cait())[2], blocks(resnet(Bottleneck))[0]
    assert x.part("attn").module is x.module.attn and x.part("lpi").module is x.module.local_mp
    assert x.part("mlp").role == "channel" and x.part("lpi").role == "token-mixing"
    assert c.layout.stream_arg == 1  # CaiT class attention: forward(patch_tokens, cls) -> cls
    assert r.part("conv").module is r.module.bn3 and not r.layout.identity_skip
    with pytest.raises(KeyError, match="has no part 'lpi'.*'attn', 'mlp'"):
        c.part("lpi")
    f, h = blocks(fan())[1], blocks(fan_hybrid())[2]
    assert f.part("attn").module is f.module.attn and f.part("mlp").module is f.module.mlp  # channel processing
    assert (f.part("attn").role, f.part("mlp").role) == (TOKEN_MIXING, CHANNEL)
    # A ConvNeXt block's branch ends in its MLP (then layer scale); its shortcut is the identity.
    assert h.part("conv").module is h.module.mlp and h.part("conv").role == CONV_BRANCH
    assert h.layout.identity_skip


def test_the_token_mixing_part_is_attn_in_the_conv_mixing_vit_and_its_attention_twin():
    x = torch.rand(2, 3, 16, 16)
    for model, mixer in ((covit(), TokenConv1d), (covit(conv=False), Attention)):
        model.eval()
        part = blocks(model)[1].part("attn")
        assert type(part.module) is mixer and part.module is model.blocks[1].attn
        assert part.role == TOKEN_MIXING
        # One call removes either twin's token mixing: block 1 then adds only its MLP branch.
        block, calls = model.blocks[1], []
        handle = block.register_forward_hook(lambda _m, args, out: calls.append((args[0], out)))
        with lesion(model, 1, "attn"), torch.no_grad():
            model(x)
            z, out = calls[0]
            assert torch.allclose(out, z + block.ls2(block.mlp(block.norm2(z))), atol=1e-6)
        handle.remove()


def test_lesion_kinds_skip_a_block_lesion_that_only_repeats_the_branch():
    assert blocks(vit())[0].lesion_kinds == ("attn", "mlp", "block")
    assert blocks(xcit())[0].lesion_kinds == ("attn", "lpi", "mlp", "block")
    assert blocks(resnet())[0].lesion_kinds == ("conv",)
    assert blocks(fan_hybrid())[0].lesion_kinds == ("conv",)  # removing the block = removing its branch
    assert blocks(fan_hybrid())[3].lesion_kinds == ("attn", "mlp", "block")


@pytest.mark.parametrize("arch, count", [
    ("xcit_nano_12_p4_32", 14), ("xcit_small_12_p16_224", 14), ("xcit_medium_12_p16_224", 14),
    ("cait_s12_224", 14), ("deit_small_patch16_224", 12), ("deit_tiny_distilled_patch16_224", 12),
    ("vit_tiny_patch16_224", 12), ("resnet50_gelu", 16), ("resnet18_gelu", 8),
    ("fan_tiny_12_p16_224", 14), ("fan_tiny_12_p8_32", 14), ("fan_small_12_p4_32", 14),
    ("fan_tiny_8_p4_hybrid", 3 + 3 + 8 + 2), ("fan_large_16_p4_hybrid_32", 3 + 5 + 22 + 2),
    ("covit_d4_e128_p4_32", 4), ("vit_d4_e128_p4_32", 4), ("covit_d12_e512_p16_224", 12)])
def test_every_architecture_advvit_trains_is_supported(arch, count):
    model = timm.create_model(arch, device="meta")  # structure only
    assert len(blocks(model)) == count


def test_wrappers_are_seen_through():
    model = vit()
    expected = [b.module for b in blocks(model)]
    normalized = NormalizedModel(model, (0.5,) * 3, (0.25,) * 3)
    wrapped = [normalized, nn.DataParallel(normalized), torch.compile(normalized),
               NormalizedModel(torch.compile(model), (0.5,) * 3, (0.25,) * 3)]
    for w in wrapped:
        assert [b.module for b in blocks(w)] == expected


def test_eager_model_keeps_the_normalization_and_drops_compile_and_data_parallel():
    model = vit().eval()
    normalized = NormalizedModel(model, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1))
    x = torch.rand(2, 3, 16, 16)
    assert eager_model(normalized) is normalized
    assert eager_model(nn.DataParallel(normalized)) is normalized
    assert eager_model(torch.compile(model)) is model
    inner_compiled = NormalizedModel(torch.compile(model), (0.5, 0.4, 0.3), (0.25, 0.2, 0.1))
    eager = eager_model(inner_compiled)
    assert isinstance(eager, NormalizedModel) and eager.model is model
    assert eager.normalization == normalized.normalization
    with torch.no_grad():
        assert torch.equal(eager(x), normalized(x))


def test_unknown_architecture_names_the_model_class():
    with pytest.raises(UnsupportedArchitectureError, match=r"residual blocks of Sequential .*supported: Cait"):
        blocks(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_unknown_block_type_names_the_block_class():
    model = vit(block_fn=ResPostBlock)  # post-norm: zeroing attn does not zero its branch
    with pytest.raises(UnsupportedArchitectureError, match=r"VisionTransformer.blocks.0 is a ResPostBlock"):
        blocks(model)


class _Toy(nn.Module):
    """A new architecture, to show what an adapter needs."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([_ToyBlock(), _ToyBlock()])

    def forward(self, x):
        for s in self.stages:
            x = s(x)
        return x


class _ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.mix(x)


@pytest.fixture
def toy_registered():
    @register_architecture(_Toy)
    def _toy(model):
        return [(f"stages.{i}", None) for i in range(len(model.stages))]

    @register_block_type(_ToyBlock)
    def _toy_block(block):
        return BlockLayout(kind="toy", parts=(Part("mlp", CHANNEL, block.mix),))
    yield
    del _ARCHITECTURES[_Toy], _BLOCK_TYPES[_ToyBlock]


def test_a_new_architecture_registers_one_adapter_of_each_kind(toy_registered):
    model = _Toy()
    found = blocks(model)
    assert [(b.name, b.part("mlp").module) for b in found] == [("stages.0", model.stages[0].mix),
                                                               ("stages.1", model.stages[1].mix)]
    assert "_Toy" in supported_architectures()


def test_find_block_by_index_name_or_block():
    found = blocks(cait())
    assert find_block(found, -1) is found[3]
    assert find_block(found, "blocks_token_only.0") is found[2]
    assert find_block(found, found[1]) is found[1]
    with pytest.raises(KeyError, match="out of range: the model has 4 blocks"):
        find_block(found, 4)
    with pytest.raises(KeyError, match="no block named 'blocks.9'"):
        find_block(found, "blocks.9")
