"""advvit.analysis.internals: known answers for Jacobian norms, propagation, similarity, lesions."""
import math
from functools import partial

import pytest
import torch
from torch import nn

import advvit  # noqa: F401  (before timm: the torchvision guard)
from timm.models.cait import Cait
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import ClassAttentionBlock, Xcit

from advvit.analysis.blocks import Block, BlockLayout, blocks
from advvit.analysis.internals import (
    block_calls, jacobian_norms, layer_similarity, lesion, lesion_study, linear_cka, propagation,
    relative_change, representation_correlation)
from advvit.attacks import fgsm
from advvit.models.covit import ConvMixBlock
from advvit.models.fan import FAN
from advvit.models import NormalizedModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _fan(**kw):
    return FAN(img_size=16, embed_dim=16, num_heads=2, cls_attn_layers=1, num_classes=5, **kw)


# Tiny models of every supported architecture: 16x16 inputs, width 16, 2 blocks (+ class attention).
TINY = {
    "vit": lambda: VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                                     num_classes=5, init_values=1.0),
    # The conv-mixing ViT as advvit.models.covit builds it (mean of all tokens pooled), kernels per block.
    "covit": lambda: VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                                       num_classes=5, init_values=1.0, class_token=True, global_pool="avg",
                                       pool_include_prefix=True,
                                       block_fn=partial(ConvMixBlock, kernel_sizes=((3, 5), (1, 3)))),
    "fan": lambda: _fan(patch_size=4, depth=2),
    # One ConvNeXt block per stage (stride-1 stem: 4x16x16, then 8x8x8 maps), 4x4 tokens, one FAN block.
    "fan-hybrid": lambda: _fan(depth=1, hybrid_depths=(1, 1), hybrid_dims=(4, 8), hybrid_stem_stride=1),
    "cait": lambda: Cait(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                         depth_token_only=1, num_classes=5),
    "xcit": lambda: Xcit(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                         cls_attn_layers=1, num_classes=5),
    "resnet-basic": lambda: ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16),
                                   stem_width=8, num_classes=5),
    "resnet-bottleneck": lambda: ResNet(block=Bottleneck, layers=(1, 1, 1, 1), channels=(4, 8, 8, 8),
                                        stem_width=8, num_classes=5),
}

_AFFINE_SCALES = ("norm1.weight", "norm2.weight", "norm3.weight", "norm.weight",
                  "bn1.weight", "bn2.weight", "bn3.weight", "bn.weight")


def trained_like(model, seed=1):
    """Replace timm's initialisation (near-identity blocks, zero-initialised residual branches:
    every block's Jacobian close to I) by weights of order one, and BatchNorm statistics that
    are not the identity, so the Jacobians have spread-out spectra."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith(_AFFINE_SCALES) else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def images(n, seed=0, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def linear_model(in_features=12, out_features=7, seed=0):
    """A linear map of the flattened input, with the Linear layer as its one block."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features, bias=False))
    block = Block(name="1", index=0, module=model[1], layout=BlockLayout(kind="linear", parts=()))
    return model, [block]


# --------------------------------------------------------------------------------------------
# Jacobian norms
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(TINY))
def test_power_iteration_matches_the_svd_of_the_full_jacobian(arch):
    model = trained_like(TINY[arch]())
    x = images(3)  # a batch of 2 and a batch of 1: the batched iteration is per example
    result = jacobian_norms(model, x, max_steps=2000, tol=1e-7, bound=True, batch_size=2)
    assert bool(result.converged.all()) and bool(result.converged_all_tokens.all())
    for col, call in enumerate(block_calls(model, x)):
        for i in range(len(x)):
            one = call.example(i)
            jac = torch.autograd.functional.jacobian(one.function(), one.stream)
            whole = torch.linalg.svdvals(jac.reshape(one.output.numel(), one.stream.numel()))[0]
            assert abs(result.sigma_all_tokens[i, col] - whole) <= 1e-3 * whole, (call.block.name, i)
            if result.paths[col] == "class-token":  # the class token's output rows only
                jac = jac[:, call.block.class_token]
            jac = jac.reshape(-1, one.stream.numel())
            exact = torch.linalg.svdvals(jac)[0]
            assert abs(result.sigma[i, col] - exact) <= 1e-3 * exact, (call.block.name, i)
            bound = (jac.abs().sum(0).max() * jac.abs().sum(1).max()).sqrt()
            assert result.bound[i, col] == pytest.approx(float(bound), rel=1e-4)
            assert result.bound[i, col] >= exact * (1 - 1e-5)


@pytest.mark.parametrize("arch", ["xcit", "fan"])
def test_a_class_attention_block_reports_its_class_token_path(arch):
    model = trained_like(TINY[arch]())
    x = images(2)
    (cls_block,) = model.cls_attn_blocks
    inputs = []
    handle = cls_block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    result = jacobian_norms(model, x, max_steps=2000, tol=1e-7)
    col = result.blocks.index("cls_attn_blocks.0")
    assert result.paths[col] == "class-token"
    assert set(result.paths[:col]) == {"all-tokens"}
    for i, z in enumerate(inputs[0]):
        tokens, width = z.shape
        with torch.no_grad():
            jac = torch.autograd.functional.jacobian(cls_block, z[None])[0, :, :, 0]  # (N, C, N, C)
        jac = jac.reshape(tokens * width, tokens * width)
        class_rows = torch.linalg.matrix_norm(jac[:width], ord=2)  # the class token's output
        assert float(result.sigma[i, col]) == pytest.approx(float(class_rows), rel=1e-4)
        assert float(result.sigma_all_tokens[i, col]) == pytest.approx(
            float(torch.linalg.matrix_norm(jac, ord=2)), rel=1e-4)
        # Why the whole output misleads: each patch token comes out as 2 (z + gamma1 * norm1(z))
        # (FAN's tokens_norm: 2 norm2(...)), from its own input alone; the patch rows are that
        # map's Jacobian, block-diagonal.
        def carried(v):
            v = v + cls_block.gamma1 * cls_block.norm1(v)
            return 2 * (cls_block.norm2(v) if cls_block.tokens_norm else v)
        expected = torch.zeros(tokens - 1, width, tokens, width)
        for t in range(1, tokens):
            expected[t - 1, :, t] = torch.autograd.functional.jacobian(carried, z[t])
        assert torch.allclose(jac[width:].reshape(expected.shape), expected, atol=1e-5)
    assert bool(result.converged[:, col].all()) and bool(result.converged_all_tokens[:, col].all())


def test_a_linear_layer_gives_its_weight_spectral_norm():
    model, linear = linear_model()
    result = jacobian_norms(model, torch.rand(4, 3, 2, 2), blocks=linear, max_steps=1000, tol=1e-8)
    expected = torch.linalg.svdvals(model[1].weight.detach())[0]
    assert torch.allclose(result.sigma[:, 0], expected.expand(4), rtol=1e-5)
    assert result.mean[0] == pytest.approx(float(expected), rel=1e-5)
    assert result.std[0] == pytest.approx(0.0, abs=1e-5)


def test_jacobian_norms_are_deterministic_for_a_seed_and_independent_of_the_batch_size():
    model = trained_like(TINY["vit"]())
    x = images(4)
    a = jacobian_norms(model, x, max_steps=5, seed=3, batch_size=4)
    b = jacobian_norms(model, x, max_steps=5, seed=3, batch_size=4)
    c = jacobian_norms(model, x, max_steps=5, seed=3, batch_size=1)
    d = jacobian_norms(model, x, max_steps=5, seed=4, batch_size=4)
    assert torch.equal(a.sigma, b.sigma)
    assert torch.allclose(a.sigma, c.sigma, rtol=1e-5)
    assert not torch.allclose(a.sigma, d.sigma, rtol=1e-5)  # 5 steps: not converged, start matters
    # Cost bookkeeping: one jvp per step, one vjp between steps; 2 blocks, 5 steps each.
    assert (a.jvp_passes, a.vjp_passes) == (2 * 5, 2 * 4)


def test_jacobian_norms_restore_the_model_mode_and_parameter_flags():
    model = trained_like(TINY["xcit"]()).train()
    jacobian_norms(model, images(2), max_steps=3)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_jacobian_norms_see_through_the_normalization_wrapper():
    # Blocks get normalized inputs either way: the wrapper's norms equal the inner model's on
    # normalized pixels.
    inner = trained_like(TINY["cait"]())
    wrapped = NormalizedModel(inner, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = images(2)
    a = jacobian_norms(wrapped, x, max_steps=50)
    b = jacobian_norms(inner, (x - 0.5) / 0.5, max_steps=50)
    assert torch.allclose(a.sigma, b.sigma, rtol=1e-5)


def test_jacobian_norms_reject_bad_settings_before_any_work():
    model = TINY["vit"]()
    with pytest.raises(ValueError, match="max_steps"):
        jacobian_norms(model, images(1), max_steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        jacobian_norms(model, images(1), batch_size=0)
    with pytest.raises(ValueError, match="bound_chunk"):
        jacobian_norms(model, images(1), bound=True, bound_chunk=0)


# --------------------------------------------------------------------------------------------
# Propagation
# --------------------------------------------------------------------------------------------

def test_relative_change_is_zero_for_no_perturbation():
    model = trained_like(TINY["xcit"]())
    x = images(3)
    assert torch.equal(relative_change(model, x, torch.zeros_like(x)), torch.zeros(3, len(blocks(model))))


def test_relative_change_of_a_linear_model_is_the_ratio_of_the_mapped_vectors():
    model, linear = linear_model()
    x, delta = torch.rand(5, 3, 2, 2), 0.1 * torch.randn(5, 3, 2, 2)
    a = model[1].weight.detach()
    expected = (delta.flatten(1) @ a.T).norm(dim=1) / (x.flatten(1) @ a.T).norm(dim=1)
    got = relative_change(model, x, delta, blocks=linear, batch_size=2)
    assert got.shape == (5, 1) and torch.allclose(got[:, 0], expected, rtol=1e-5)


def test_propagation_measures_fgsm_pgd_and_matched_random_controls_on_a_linear_model():
    model, linear = linear_model(out_features=5)
    x = images(6, lo=0.25, hi=0.75).mean(1, keepdim=True)[:, :, :3, :4]  # (6, 1, 3, 4): no clipping
    y = torch.arange(6) % 5
    eps = 0.02
    result = propagation(model, x, y, eps=eps, pgd_steps=3, blocks=linear, seed=0, batch_size=4)
    assert list(result.effects) == ["fgsm", "random(fgsm)", "pgd-3", "random(pgd-3)"]
    a = model[1].weight.detach()
    delta = fgsm(model, x, y, eps=eps, random_init=False) - x
    expected = (delta.flatten(1) @ a.T).norm(dim=1) / (x.flatten(1) @ a.T).norm(dim=1)
    fg = result.effects["fgsm"]
    assert torch.allclose(fg.ratio[:, 0], expected, rtol=1e-4)
    assert torch.allclose(fg.linf, torch.full((6,), eps), rtol=1e-5)
    for attack in ("fgsm", "pgd-3"):
        control = result.effects[f"random({attack})"]
        assert control.matched_to == attack
        assert torch.allclose(control.l2, result.effects[attack].l2, rtol=1e-5)
        assert bool((control.linf <= eps * (1 + 1e-5)).all())
    # The gradient direction moves the output more than a random one of the same norm.
    assert bool((fg.ratio > result.effects["random(fgsm)"].ratio).all())


def test_propagation_is_deterministic_for_a_seed():
    model = trained_like(TINY["vit"]())
    x, y = images(3), torch.tensor([0, 1, 2])
    a = propagation(model, x, y, eps=4 / 255, pgd_steps=2, seed=5)
    b = propagation(model, x, y, eps=4 / 255, pgd_steps=2, seed=5)
    for name in a.effects:
        assert torch.equal(a.effects[name].ratio, b.effects[name].ratio)
    assert a.effects["pgd-2"].ratio.shape == (3, 2) and a.effects["pgd-2"].mean.shape == (2,)


def test_propagation_checks_the_attack_before_any_work():
    with pytest.raises(ValueError, match="norm must be one of"):
        propagation(TINY["vit"](), images(2), torch.tensor([0, 1]), eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="one label per input"):
        propagation(TINY["vit"](), images(2), torch.tensor([0]), eps=0.1)


# --------------------------------------------------------------------------------------------
# Layer similarity
# --------------------------------------------------------------------------------------------

def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    y = 3.7 * x @ q
    assert float(linear_cka(x, y)) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(z, y)) == pytest.approx(float(linear_cka(z, x)), abs=1e-12)
    assert float(linear_cka(x, z)) == pytest.approx(float(linear_cka(z, x)), abs=1e-12)
    assert 0.0 < float(linear_cka(x, z)) < 1.0


def test_cka_of_one_dimensional_features_is_the_squared_pearson_correlation():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, generator=g, dtype=torch.float64)
    b = 0.5 * a + torch.randn(50, generator=g, dtype=torch.float64)
    pearson = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert float(linear_cka(a[:, None], b[:, None])) == pytest.approx(float(pearson) ** 2, abs=1e-12)


def test_correlation_of_a_representation_with_itself_and_its_negative():
    x = torch.randn(10, 4, 3)
    assert float(representation_correlation(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(representation_correlation(x, -x)) == pytest.approx(-1.0, abs=1e-12)
    with pytest.raises(ValueError, match="no entry-by-entry correlation"):
        representation_correlation(x, x[:, :2])


def test_each_block_is_fully_similar_to_itself():
    model = trained_like(TINY["vit"]())
    result = layer_similarity(model, images(6), batch_size=4)
    for m in (result.tokens.correlation, result.tokens.cka, result.class_token.correlation, result.class_token.cka):
        assert m.shape == (2, 2) and torch.allclose(m.diagonal(), torch.ones(2, dtype=m.dtype), atol=1e-9)
        assert torch.equal(m, m.T)
    assert float(result.tokens.cka[0, 1]) < 1.0


def test_similarity_marks_what_a_block_lacks():
    # CaiT: self-attention blocks have no class token; its class-attention block outputs only it.
    model = trained_like(TINY["cait"]())
    result = layer_similarity(model, images(5))
    cls, tok = result.class_token, result.tokens
    assert torch.isnan(cls.cka[:2]).all() and torch.isnan(cls.cka[:, :2]).all()
    assert float(cls.cka[2, 2]) == pytest.approx(1.0, abs=1e-9)
    assert torch.isnan(tok.correlation[0, 2]) and not torch.isnan(tok.cka[0, 2])
    with pytest.raises(ValueError, match="at least 2 inputs"):
        layer_similarity(model, images(1))


def test_correlation_needs_the_same_layout_not_only_the_same_size():
    # Every stage outputs 64 values per example: 4x4x4, 16x2x2, 64x1x1, 64x1x1.
    model = trained_like(ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(4, 16, 64, 64),
                                stem_width=8, num_classes=5))
    corr = layer_similarity(model, images(4)).tokens.correlation
    assert torch.isnan(corr[0, 1]) and torch.isnan(corr[1, 2]) and not torch.isnan(corr[2, 3])


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------

def _zero_branches(model, index):
    """Zero-initialise block ``index``'s residual branches: its layer scales (``gamma``) = 0."""
    with torch.no_grad():
        for name, p in blocks(model)[index].module.named_parameters():
            if name.rpartition(".")[2].startswith("gamma"):
                p.zero_()


@pytest.mark.parametrize("arch, index", [
    ("vit", 1), ("cait", 0), ("cait", 2), ("xcit", 1), ("xcit", 2), ("covit", 1), ("fan", 1), ("fan", 2),
    ("fan-hybrid", 0), ("fan-hybrid", 1), ("fan-hybrid", 2), ("fan-hybrid", 3)])
def test_lesioning_a_zero_initialised_branch_leaves_outputs_unchanged(arch, index):
    model = trained_like(TINY[arch]())
    x = images(2)
    live = outputs(model, x)
    for kind in blocks(model)[index].part_names:  # a live branch: removing it changes the output
        with lesion(model, index, kind):
            assert not torch.allclose(outputs(model, x), live, atol=1e-4), kind
    _zero_branches(model, index)
    before = outputs(model, x)
    # XCiT's class-attention block (FAN's too) is no identity even with zero gammas (it
    # normalizes tokens), so only its parts are removed there.
    module = blocks(model)[index].module
    kinds = blocks(model)[index].part_names + (() if isinstance(module, ClassAttentionBlock) else ("block",))
    for kind in kinds:
        with lesion(model, index, kind):
            assert torch.equal(outputs(model, x), before), kind


def test_removing_a_convnext_block_is_removing_its_branch():
    # Why a ConvNeXt block's lesion kinds are ("conv",) alone: with its identity shortcut, the
    # block lesion gives exactly the model without the branch.
    model = trained_like(TINY["fan-hybrid"]())
    x = images(2)
    live = outputs(model, x)
    for index in (0, 1):
        assert blocks(model)[index].lesion_kinds == ("conv",)
        with lesion(model, index, "conv"):
            without_branch = outputs(model, x)
        with lesion(model, index, "block"):
            assert torch.equal(outputs(model, x), without_branch)
        assert not torch.allclose(without_branch, live, atol=1e-4)


def test_resnet_blocks_are_zero_initialised_by_timm_so_lesions_change_nothing():
    model = TINY["resnet-bottleneck"]().eval()  # timm zero-initialises the last BN of each branch
    x = images(2)
    before = outputs(model, x)
    for b in blocks(model):
        for kind in ("conv", "block"):
            with lesion(model, b, kind):
                assert torch.equal(outputs(model, x), before)
    trained_like(model)
    live = outputs(model, x)
    with lesion(model, "layer2.0", "conv"):
        assert not torch.allclose(outputs(model, x), live, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_a_lesion_restores_the_model_exactly(arch):
    model = trained_like(TINY[arch]())
    wrapped = NormalizedModel(model, (0.5,) * 3, (0.25,) * 3)
    x = images(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = outputs(wrapped, x)
    for b in blocks(wrapped):
        for kind in b.lesion_kinds:
            with lesion(wrapped, b.index, kind):
                outputs(wrapped, x)
    with pytest.raises(RuntimeError, match="inside"):
        with lesion(wrapped, 0, "block"):
            raise RuntimeError("inside")
    assert all(not m._forward_hooks for m in model.modules())
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(outputs(wrapped, x), before)


def test_lesion_gives_the_eager_model_to_call():
    # A compiled module does not see hooks added after compiling: the lesion hands back the
    # same modules without the compile wrapper (nothing is compiled here).
    model = trained_like(TINY["vit"]())
    x = images(2)
    before = outputs(model, x)
    with lesion(torch.compile(model), 1, "block") as lesioned:
        assert lesioned is model and not torch.equal(outputs(lesioned, x), before)
    assert torch.equal(outputs(model, x), before)


def test_lesion_names_what_a_block_has():
    model = TINY["cait"]()
    with pytest.raises(ValueError, match=r"'lpi' is not one of block blocks.0's: \['attn', 'mlp', 'block'\]"):
        with lesion(model, 0, "lpi"):
            pass
    with pytest.raises(KeyError, match="out of range"):
        with lesion(model, 7):
            pass


def test_lesion_study_on_a_zero_initialised_block_equals_the_intact_model():
    model = trained_like(TINY["xcit"]())
    _zero_branches(model, 1)
    x, y = images(6), torch.arange(6) % 5
    study = lesion_study(model, x, y, eps=8 / 255, steps=2, batch_size=4)
    assert study.kinds == ("attn", "lpi", "mlp", "block")
    assert study.blocks == ("blocks.0", "blocks.1", "cls_attn_blocks.0")
    assert study.clean_accuracy.shape == (4, 3)
    # Block 1 does nothing: every lesion of it gives the intact model's accuracies (same seeds).
    as_column = lambda v: torch.full((4,), v, dtype=torch.float64)  # noqa: E731
    assert torch.equal(study.clean_accuracy[:, 1], as_column(study.baseline_clean))
    assert torch.equal(study.robust_accuracy[:, 1], as_column(study.baseline_robust))
    # The class-attention block has no LPI.
    assert math.isnan(study.clean_accuracy[1, 2]) and not math.isnan(study.clean_accuracy[0, 2])
    rows = study.rows()
    assert len(rows) == 4 * 3 - 1 and all(0.0 <= r["clean"] <= 1.0 for r in rows)
    assert {r["robust_drop"] for r in rows if r["block"] == "blocks.1"} == {0.0}
    # Image by image too, and every accuracy is the mean of its outcomes.
    for k in range(4):
        assert torch.equal(study.clean_correct[k, 1], study.baseline_clean_correct)
        assert torch.equal(study.robust_correct[k, 1], study.baseline_robust_correct)
    ran = ~torch.isnan(study.clean_accuracy)
    assert torch.equal(study.clean_correct.double().mean(-1)[ran], study.clean_accuracy[ran])
    assert torch.equal(study.robust_correct.double().mean(-1)[ran], study.robust_accuracy[ran])
    per = study.to_dict()["per_example"]
    assert per["clean"][1][2] is None and len(per["robust"][0][2]) == 6
    assert sum(per["baseline_clean"]) / 6 == study.baseline_clean


def test_lesion_study_by_default_skips_a_block_lesion_that_repeats_a_branch():
    # FAN-hybrid: ConvNeXt blocks (one branch: removing the block is removing "conv") before a
    # FAN block, which has a distinct "block" lesion.
    model = trained_like(TINY["fan-hybrid"]())
    x, y = images(2), torch.arange(2)
    study = lesion_study(model, x, y, eps=0.0, steps=1)
    assert study.kinds == ("conv", "attn", "mlp", "block")
    ran = lambda s, kind: [b for b, v in zip(s.blocks, s.clean_accuracy[s.kinds.index(kind)])  # noqa: E731
                           if not math.isnan(v)]
    convnext = [b.name for b in blocks(model) if b.kind == "convnext"]
    assert len(convnext) == 2 and ran(study, "conv") == convnext
    assert ran(study, "block") == ["blocks.0", "cls_attn_blocks.0"]
    assert len(study.rows()) == 2 + 2 * 2 + 2
    # asked for, the block lesion applies to every block
    asked = lesion_study(model, x, y, eps=0.0, steps=1, kinds=["block"])
    assert ran(asked, "block") == list(asked.blocks)


def test_lesion_study_with_eps_zero_gives_clean_accuracy_as_robust():
    model = trained_like(TINY["resnet-basic"]())
    x, y = images(4), torch.arange(4)
    study = lesion_study(model, x, y, eps=0.0, steps=1)
    assert study.kinds == ("conv",)
    assert torch.equal(study.clean_accuracy, study.robust_accuracy)
    with pytest.raises(ValueError, match=r"lesion kinds \['attn'\] are not in this model"):
        lesion_study(model, x, y, eps=0.0, kinds=["attn"])
