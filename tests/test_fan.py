"""FAN (NVlabs/FAN): registered names, parameter counts, released key names, 32x32 variants, training."""
import json
import re

import pytest
import torch

import advvit  # noqa: F401  (before timm: the torchvision guard)
import timm
from advvit.models import fan as F
from advvit import models as M
from arch_checks import adversarial_step_changes_every_parameter, export_and_reload, n_params, \
    params_without_gradient

VIT = ("fan_tiny_12_p16_224", "fan_small_12_p16_224", "fan_base_18_p16_224", "fan_large_24_p16_224")
HYBRID = ("fan_tiny_8_p4_hybrid", "fan_small_12_p4_hybrid", "fan_base_16_p4_hybrid", "fan_large_16_p4_hybrid")
SMALL_VIT = ("fan_tiny_12_p4_32", "fan_small_12_p4_32", "fan_base_18_p4_32", "fan_large_24_p4_32")
SMALL_HYBRID = tuple(n + "_32" for n in HYBRID)

# Exact counts of the public code's models (its FAN class built with these names' arguments), at
# 1000 classes; and the paper / README's rounded figures.
PUBLIC_CODE_COUNTS = dict(zip(VIT + HYBRID, (7_319_920, 28_345_336, 54_350_320, 80_574_100,
                                             7_467_240, 26_117_944, 50_475_048, 76_855_140)))
PAPER_MILLIONS = dict(zip(VIT + HYBRID, (7.3, 28.0, 54.0, 80.5, 7.4, 26.3, 50.4, 76.8)))
# FAN-S-ViT: the paper says 28.0M, the public code's fan_small_12_p16_224 has 28.35M (1.2% more).
PAPER_TOLERANCE = {"fan_small_12_p16_224": 0.0125}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def meta(name, **kw):
    return timm.create_model(name, device="meta", **kw)


def test_every_variant_is_in_timms_registry_and_advvits_list():
    assert set(F.REGISTERED) == set(VIT + HYBRID + SMALL_VIT + SMALL_HYBRID
                                    + ("fan_tiny_12_p8_32", "fan_nano_12_p8_32"))
    assert set(F.REGISTERED) <= set(timm.list_models("fan_*"))
    assert set(F.REGISTERED) <= set(M.iter_registered())


@pytest.mark.parametrize("name", VIT + HYBRID)
def test_parameter_counts_match_the_public_code_and_the_paper(name):
    count = n_params(meta(name))
    assert count == PUBLIC_CODE_COUNTS[name]
    paper = PAPER_MILLIONS[name] * 1e6
    assert abs(count - paper) / paper <= PAPER_TOLERANCE.get(name, 0.01), f"{name}: {count / 1e6:.2f}M"
    # The docstring gives both: the count of the model built here and the paper's.
    said = re.search(r"([\d.]+)M parameters, as the public code's model; the paper gives ([\d.]+)M",
                     " ".join(getattr(F, name).__doc__.split()))
    assert said and float(said[1]) == round(count / 1e6, 2) and float(said[2]) == PAPER_MILLIONS[name], name


@pytest.mark.parametrize("small, big", list(zip(SMALL_VIT + SMALL_HYBRID + ("fan_tiny_12_p8_32",),
                                                VIT + HYBRID + ("fan_tiny_12_p16_224",))))
def test_small_input_variants_have_the_224_models_weights(small, big):
    a, b = meta(small).state_dict(), meta(big).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def _block_keys(i):
    return [f"blocks.{i}.{k}" for k in (
        "norm1.weight", "attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.proj.bias", "norm2.bias",
        "mlp.temperature", "mlp.q.weight", "mlp.mlp_v.fc1.weight", "mlp.mlp_v.dwconv.conv1.weight",
        "mlp.mlp_v.dwconv.bn.running_var", "mlp.mlp_v.dwconv.conv2.bias", "mlp.mlp_v.gamma",
        "mlp.mlp_v.fc2.weight", "mlp.norm_v.weight", "gamma1", "gamma2")]


HEAD_KEYS = ["cls_token", "pos_embed.token_projection.weight", "cls_attn_blocks.0.attn.q.weight",
             "cls_attn_blocks.1.attn.k.bias", "cls_attn_blocks.1.attn.v.weight", "cls_attn_blocks.1.mlp.fc2.bias",
             "cls_attn_blocks.1.gamma1", "cls_attn_blocks.1.norm2.weight", "norm.weight", "head.weight"]
VIT_STEM_KEYS = ["patch_embed.proj.0.0.weight", "patch_embed.proj.0.1.running_mean", "patch_embed.proj.2.0.weight",
                 "patch_embed.proj.6.1.bias"]


def _hybrid_stem_keys(last_block):
    p = "patch_embed.backbone."
    return [p + "stem.0.weight", p + "stem.1.bias", p + "stages.0.blocks.0.conv_dw.weight",
            p + "stages.0.blocks.2.mlp.fc1.weight", p + "stages.0.blocks.2.gamma", p + "stages.1.downsample.0.weight",
            p + "stages.1.downsample.1.weight", p + f"stages.1.blocks.{last_block}.mlp.fc2.bias",
            "patch_embed.proj.weight"]


@pytest.mark.parametrize("name, depth, heads, dim", [
    ("fan_tiny_12_p16_224", 12, 4, 192), ("fan_small_12_p16_224", 12, 8, 384),
    ("fan_base_18_p16_224", 18, 8, 448), ("fan_large_24_p16_224", 24, 10, 480),
    ("fan_tiny_8_p4_hybrid", 8, 8, 192), ("fan_small_12_p4_hybrid", 10, 8, 384),
    ("fan_base_16_p4_hybrid", 16, 8, 448), ("fan_large_16_p4_hybrid", 22, 10, 480)])
def test_state_dict_keys_are_the_released_checkpoints(name, depth, heads, dim):
    sd = meta(name).state_dict()
    hybrid = "hybrid" in name
    stem = _hybrid_stem_keys(4 if name.startswith("fan_large") else 2) if hybrid else VIT_STEM_KEYS
    expected = stem + HEAD_KEYS + _block_keys(0) + _block_keys(depth - 1)
    assert [k for k in expected if k not in sd] == []
    assert f"blocks.{depth}.gamma1" not in sd and "cls_attn_blocks.2.gamma1" not in sd
    assert sd["blocks.0.mlp.temperature"].shape == (heads, 1, 1)
    assert sd["blocks.0.attn.kv.weight"].shape == (2 * dim, dim)
    assert sd["blocks.0.mlp.mlp_v.fc1.weight"].shape == (4 * dim, dim)
    assert sd["blocks.0.mlp.mlp_v.dwconv.conv1.weight"].shape == (4 * dim, 1, 3, 3)
    if hybrid:
        # the ConvNeXt MLPs are 1x1 convolutions in the released weights
        assert sd["patch_embed.backbone.stages.0.blocks.0.mlp.fc1.weight"].shape == (512, 128, 1, 1)
        assert sd["patch_embed.proj.weight"].shape == (dim, 256, 2, 2)
        assert not any(k.startswith("patch_embed.proj.0") for k in sd)
    else:
        assert sd["patch_embed.proj.6.0.weight"].shape == (dim, dim // 2, 3, 3)
        assert not any(k.startswith("patch_embed.backbone") for k in sd)


def test_the_key_count_of_the_public_codes_tiny_models():
    # The public code's fan_tiny_12_p16_224 / fan_tiny_8_p4_hybrid have 439 / 355 state-dict entries.
    assert len(meta("fan_tiny_12_p16_224").state_dict()) == 439
    assert len(meta("fan_tiny_8_p4_hybrid").state_dict()) == 355


def test_released_checkpoint_containers_and_fused_class_attention_load():
    torch.manual_seed(0)
    src = timm.create_model("fan_tiny_12_p16_224", depth=1, num_classes=5).eval()
    sd = src.state_dict()
    # a checkpoint whose class-attention blocks store one fused qkv, inside the training script's container
    for i in range(2):
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"cls_attn_blocks.{i}.attn.{s}.{kind}") for s in "qkv"]
            sd[f"cls_attn_blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    dst = timm.create_model("fan_tiny_12_p16_224", depth=1, num_classes=5).eval()
    dst.load_state_dict(F.checkpoint_filter_fn({"state_dict": sd}, dst), strict=True)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("name", ["fan_tiny_12_p16_224", "fan_tiny_8_p4_hybrid"])
def test_tiny_models_at_224(name):
    model = timm.create_model(name).eval()
    assert n_params(model) == PUBLIC_CODE_COUNTS[name]
    x = torch.rand(1, 3, 224, 224)
    feats = model.forward_features(x)
    assert feats.shape == (1, 1 + 14 * 14, 192)  # class token + 14x14 tokens
    logits = model.forward_head(feats)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    torch.testing.assert_close(model(x), logits)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 192)


@pytest.mark.parametrize("name, grid", [("fan_tiny_12_p4_32", 8), ("fan_tiny_12_p8_32", 4),
                                        ("fan_tiny_8_p4_hybrid_32", 8)])
def test_tiny_small_input_models_at_32(name, grid):
    model = timm.create_model(name, num_classes=10).eval()
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.patch_embed.grid_size == (grid, grid)
    x = torch.rand(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 1 + grid * grid, 192)
    assert model(x).shape == (2, 10)


def test_patch_sizes_reached_by_strides_and_the_error_for_others():
    model = timm.create_model("fan_tiny_12_p16_224", depth=1, img_size=32, patch_size=2)
    strides = [c.stride for c in F._patch_convs(model.patch_embed)]
    assert strides == [(1, 1), (1, 1), (1, 1), (2, 2)]
    assert model.patch_embed.grid_size == (16, 16)
    assert model.forward_features(torch.rand(1, 3, 32, 32)).shape[1] == 1 + 256
    with pytest.raises(ValueError, match="power of two"):
        timm.create_model("fan_tiny_12_p16_224", depth=1, patch_size=6)
    with pytest.raises(ValueError, match="stem_stride"):
        timm.create_model("fan_tiny_8_p4_hybrid", depth=1, hybrid_stem_stride=2)


def test_create_model_grayscale_28_pixels_and_normalized_wrapper():
    model = M.create_model("fan_tiny_12_p4_32", num_classes=10, in_chans=1, img_size=28, depth=2,
                           normalize=((0.286,), (0.353,))).eval()
    inner = M.unwrap(model)
    assert inner.patch_embed.grid_size == (7, 7) and inner.patch_embed.img_size == (28, 28)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), inner((x - 0.286) / 0.353))
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    model.reset_classifier(4)
    assert model(x).shape == (3, 4) and model.get_classifier().out_features == 4


@pytest.mark.parametrize("src_name, dst_name, first_conv", [
    ("fan_tiny_12_p16_224", "fan_tiny_12_p4_32", "patch_embed.proj.0.0"),
    ("fan_tiny_8_p4_hybrid", "fan_tiny_8_p4_hybrid_32", "patch_embed.backbone.stem.0")])
def test_finetune_from_a_224_checkpoint_to_grayscale_32(src_name, dst_name, first_conv):
    src = timm.create_model(src_name, depth=2, num_classes=1000)
    dst = M.create_model(dst_name, depth=2, num_classes=10, in_chans=1, img_size=32)
    assert sorted(M.load_finetune_weights(dst, src.state_dict())) == ["head.bias", "head.weight"]
    own, theirs = dst.state_dict(), src.state_dict()
    key = first_conv + ".weight"
    torch.testing.assert_close(own[key], theirs[key].sum(1, keepdim=True))  # 3 channels -> 1
    torch.testing.assert_close(own["blocks.1.mlp.q.weight"], theirs["blocks.1.mlp.q.weight"])
    assert dst(torch.rand(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["fan_tiny_12_p4_32", "fan_tiny_8_p4_hybrid_32"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, depth=2)
    assert params_without_gradient(model, torch.rand(2, 3, 32, 32)) == []


def test_one_adversarial_training_step_updates_every_parameter():
    torch.manual_seed(0)
    model = M.create_model("fan_tiny_12_p8_32", num_classes=10, in_chans=1, img_size=32, depth=2)
    loss, unchanged = adversarial_step_changes_every_parameter(model, torch.rand(4, 1, 32, 32),
                                                               torch.randint(0, 10, (4,)))
    assert loss > 0 and unchanged == []


@pytest.mark.parametrize("arch", ["fan_tiny_12_p4_32", "fan_tiny_8_p4_hybrid_32"])
def test_export_reloads_with_the_same_outputs(tmp_path, arch):
    before, after, out = export_and_reload(tmp_path, arch, in_chans=1, img_size=32, depth=1)
    torch.testing.assert_close(after, before)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == arch and "advvit.models" in config["advvit"]["requires"]


@pytest.mark.slow
def test_torch_compile_matches_eager_forward_and_input_gradient():
    torch.manual_seed(0)
    model = timm.create_model("fan_tiny_12_p8_32", num_classes=10, depth=1).eval()
    compiled = torch.compile(model)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    eager_out = model(x)
    (g_eager,) = torch.autograd.grad(eager_out.sum(), x)
    out = compiled(x)
    (g_compiled,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5)
