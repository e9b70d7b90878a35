"""The conv-mixing ViT and its attention twin: names, counts, the token convolution, training, export."""
import pytest
import torch

import advvit  # noqa: F401  (before timm: the torchvision guard)
import timm
from advvit import covit as CV
from advvit import models as M
from arch_checks import adversarial_step_changes_every_parameter, export_and_reload, n_params, \
    params_without_gradient


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def expected_count(conv, depth, width, patch, img, in_chans=3, classes=1000, kernel_sum=12, heads=4):
    """Parameters by hand: patch conv, class token, positions, blocks, pooled norm, head."""
    tokens = (img // patch) ** 2 + 1
    embed = width * in_chans * patch * patch + width + width + tokens * width
    norms_mlp = 4 * width + 8 * width * width + 5 * width       # two LayerNorms, MLP 4x
    if conv:
        c = width // heads
        mixer = c * c * kernel_sum + width + width * width + width  # per-head convs, projection
    else:
        mixer = 3 * width * width + 3 * width + width * width + width  # qkv, projection
    return embed + depth * (norms_mlp + mixer) + 2 * width + width * classes + classes


def test_the_grid_is_registered_for_both_mixers():
    names = set(CV.REGISTERED)
    assert len(names) == 2 * 2 * len(CV.DEPTHS) * len(CV.WIDTHS) == 144
    for fam in ("covit", "vit"):
        for d in (1, 6, 12):
            for e in (128, 256, 512):
                assert {f"{fam}_d{d}_e{e}_p16_224", f"{fam}_d{d}_e{e}_p4_32"} <= names
    assert names <= set(timm.list_models()) and names <= set(M.iter_registered())


@pytest.mark.parametrize("name", CV.REGISTERED)
def test_parameter_count_of_every_variant(name):
    conv, depth, width, patch, img = CV._VARIANTS[name]
    model = timm.create_model(name, device="meta")
    assert len(model.blocks) == depth and model.embed_dim == width and model.patch_embed.patch_size == (patch, patch)
    assert n_params(model) == expected_count(conv, depth, width, patch, img)


def test_twins_differ_only_in_the_token_mixer():
    a = timm.create_model("covit_d3_e128_p4_32", device="meta").state_dict()
    b = timm.create_model("vit_d3_e128_p4_32", device="meta").state_dict()
    mixer = lambda k: ".attn." in k and ".attn.proj." not in k  # noqa: E731
    assert {k: v.shape for k, v in a.items() if not mixer(k)} == {k: v.shape for k, v in b.items() if not mixer(k)}
    assert sorted(k for k in a if k.startswith("blocks.0.attn.")) == [
        "blocks.0.attn.convs.0.bias", "blocks.0.attn.convs.0.weight", "blocks.0.attn.convs.1.bias",
        "blocks.0.attn.convs.1.weight", "blocks.0.attn.convs.2.bias", "blocks.0.attn.convs.2.weight",
        "blocks.0.attn.convs.3.bias", "blocks.0.attn.convs.3.weight", "blocks.0.attn.proj.bias",
        "blocks.0.attn.proj.weight"]
    assert a["blocks.0.attn.convs.0.weight"].shape == (32, 32, 3)
    assert "blocks.0.attn.qkv.weight" in b


def test_token_convolution_known_answer():
    # Two heads of 2 channels; head 0 shifts the sequence by one token, head 1 keeps it; identity projection.
    mixer = CV.TokenConv1d(4, (3, 1))
    with torch.no_grad():
        mixer.convs[0].weight.zero_()
        mixer.convs[0].weight[0, 0, 0] = mixer.convs[0].weight[1, 1, 0] = 1.0  # out[t] = in[t - 1]
        mixer.convs[1].weight.copy_(torch.eye(2).view(2, 2, 1))
        for m in (mixer.convs[0], mixer.convs[1], mixer.proj):
            m.bias.zero_()
        mixer.proj.weight.copy_(torch.eye(4))
    x = torch.randn(2, 5, 4)
    y = mixer(x)
    torch.testing.assert_close(y[:, 1:, :2], x[:, :-1, :2])
    torch.testing.assert_close(y[:, 0, :2], torch.zeros(2, 2))  # zero padding before the first token
    torch.testing.assert_close(y[..., 2:], x[..., 2:])
    with pytest.raises(ValueError, match="attention mask"):
        mixer(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_kernel_sizes_per_head_and_per_block_and_their_errors():
    model = timm.create_model("covit_d2_e128_p4_32", kernel_sizes=[(1, 1, 1, 1), (3, 5, 7, 9)], num_classes=3)
    assert [c.kernel_size for c in model.blocks[1].attn.convs] == [(3,), (5,), (7,), (9,)]
    assert model.blocks[0].attn.kernel_sizes == (1, 1, 1, 1)
    assert n_params(model) == expected_count(True, 1, 128, 4, 32, classes=3, kernel_sum=4) + \
        expected_count(True, 1, 128, 4, 32, classes=3, kernel_sum=24) - expected_count(True, 0, 128, 4, 32, classes=3)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="one kernel size per head"):
        timm.create_model("covit_d1_e128_p4_32", kernel_sizes=(3, 3))
    with pytest.raises(ValueError, match="per-block entries"):
        timm.create_model("covit_d2_e128_p4_32", kernel_sizes=[(3, 3, 3, 3)] * 3)
    with pytest.raises(ValueError, match="attention twin"):
        timm.create_model("vit_d2_e128_p4_32", kernel_sizes=(3, 3, 3, 3))


@pytest.mark.parametrize("name, size, tokens", [("covit_d1_e128_p16_224", 224, 196), ("vit_d1_e128_p16_224", 224, 196),
                                                ("covit_d4_e128_p4_32", 32, 64), ("vit_d4_e128_p4_32", 32, 64)])
def test_forward_shapes_and_the_mean_pooled_head(name, size, tokens):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.rand(2, 3, size, size)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + tokens, 128)
    # the head: mean over every token, class token included, then LayerNorm and the linear layer
    torch.testing.assert_close(model(x), model.head(model.fc_norm(feats.mean(dim=1))))


def test_create_model_grayscale_28_with_normalization():
    model = M.create_model("covit_d2_e128_p4_32", num_classes=10, in_chans=1, img_size=28,
                           normalize=((0.286,), (0.353,))).eval()
    assert M.unwrap(model).patch_embed.grid_size == (7, 7)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), M.unwrap(model)((x - 0.286) / 0.353))


@pytest.mark.parametrize("name", ["covit_d2_e128_p4_32", "vit_d2_e128_p4_32"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    assert params_without_gradient(model, torch.rand(2, 3, 32, 32)) == []


@pytest.mark.parametrize("name", ["covit_d2_e128_p4_32", "vit_d2_e128_p4_32"])
def test_one_adversarial_training_step_updates_every_parameter(name):
    torch.manual_seed(0)
    model = M.create_model(name, num_classes=10, in_chans=1, img_size=32)
    loss, unchanged = adversarial_step_changes_every_parameter(model, torch.rand(4, 1, 32, 32),
                                                               torch.randint(0, 10, (4,)))
    assert loss > 0 and unchanged == []


def test_export_reloads_with_the_same_outputs_and_kernel_sizes(tmp_path):
    before, after, _ = export_and_reload(tmp_path, "covit_d2_e128_p4_32", in_chans=1, img_size=32,
                                         kernel_sizes=[[1, 3, 5, 7], [3, 3, 3, 3]])
    torch.testing.assert_close(after, before)
