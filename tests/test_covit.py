"""The conv-mixing ViT and its attention twin: names, counts, the token convolution, training, export."""
import pytest
import torch
from torch import nn

import advvit  # noqa: F401  (before timm: the torchvision guard)
import timm
from advvit.models import covit as CV
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


# ------------------------------------------- against the paper's code's definition (ODE4RobustViT)

class _PaperMixer(nn.Module):
    """The public code's token mixers, by their definition there: ``MultiHeadConv1D`` (channels
    split into contiguous heads, a Conv1d per head, padding k // 2, a projection) or
    ``MultiHeadAttention`` (``qk`` with q and k interleaved per channel, ``(h d qk)``, ``v``,
    softmax(Q K^T / sqrt(d)) V, a projection)."""

    def __init__(self, width, heads, kernel_sizes=None):
        super().__init__()
        self.heads = heads
        d = width // heads
        if kernel_sizes:
            self.convs = nn.ModuleList([nn.Conv1d(d, d, k, padding=k // 2) for k in kernel_sizes])
        else:
            self.qk, self.v = nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.projection = nn.Linear(width, width)

    def forward(self, x):
        b, n, e = x.shape
        h, d = self.heads, e // self.heads
        if hasattr(self, "convs"):
            heads = x.permute(0, 2, 1).reshape(b, h, d, n)
            out = torch.stack([conv(heads[:, i]) for i, conv in enumerate(self.convs)], 1)
            return self.projection(out.reshape(b, e, n).permute(0, 2, 1))
        qk = self.qk(x).reshape(b, n, h, d, 2)
        q, k = qk[..., 0].transpose(1, 2), qk[..., 1].transpose(1, 2)  # (b, h, n, d)
        v = self.v(x).reshape(b, n, h, d).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        return self.projection((att @ v).transpose(1, 2).reshape(b, n, e))


class _PaperModel(nn.Module):
    """The public code's ``CoViT`` / ``ViT``: patch conv, class token, position embedding added
    to every token, pre-norm blocks with ``nn.LayerNorm``'s defaults, mean of all tokens,
    LayerNorm, linear head."""

    def __init__(self, width, depth, patch, img, classes, kernel_sizes=None, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn((img // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList([nn.ModuleDict({
            "ln1": nn.LayerNorm(width), "mix": _PaperMixer(width, heads, kernel_sizes), "ln2": nn.LayerNorm(width),
            "fc1": nn.Linear(width, 4 * width), "fc2": nn.Linear(4 * width, width)}) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = x + blk["mix"](blk["ln1"](x))
            x = x + blk["fc2"](nn.functional.gelu(blk["fc1"](blk["ln2"](x))))
        return self.head(self.norm(x.mean(1)))


def _paper_state_dict(sd, heads=4):
    """advvit's (timm's) state dict under the reference's names (timm's fused qkv split into the
    public code's interleaved qk and v)."""
    out = {"patch.weight": sd["patch_embed.proj.weight"], "patch.bias": sd["patch_embed.proj.bias"],
           "cls": sd["cls_token"], "pos": sd["pos_embed"][0], "norm.weight": sd["fc_norm.weight"],
           "norm.bias": sd["fc_norm.bias"], "head.weight": sd["head.weight"], "head.bias": sd["head.bias"]}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"blocks.{i}."
        for a, b in (("norm1", "ln1"), ("norm2", "ln2"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"),
                     ("attn.proj", "mix.projection")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for k, v in sd.items():
            if k.startswith(f"{src}attn.convs."):
                out[dst + "mix." + k[len(src) + 5:]] = v
        if f"{src}attn.qkv.weight" in sd:
            for p in ("weight", "bias"):
                q, k, v = sd[f"{src}attn.qkv.{p}"].chunk(3)
                split = (heads, q.shape[0] // heads) + q.shape[1:]
                out[f"{dst}mix.qk.{p}"] = torch.stack([q.reshape(split), k.reshape(split)], 2).reshape(
                    (2 * q.shape[0],) + q.shape[1:])
                out[f"{dst}mix.v.{p}"] = v
    return out


@pytest.mark.parametrize("name", ["covit_d2_e128_p4_32", "vit_d2_e128_p4_32"])
@pytest.mark.parametrize("small", [False, True])
def test_logits_equal_the_public_codes_model_with_the_same_weights(name, small):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, kernel_sizes=(3, 1, 5, 3)) if name.startswith("covit") \
        else timm.create_model(name, num_classes=10)
    kernels = model.blocks[0].attn.kernel_sizes if name.startswith("covit") else None
    reference = _PaperModel(128, 2, 4, 32, 10, kernel_sizes=kernels)
    sd = model.state_dict()
    if small:  # LayerNorm inputs of order 1e-3: its eps (1e-5, not 1e-6) changes the logits by a lot
        sd = {k: v * 1e-3 if k.startswith(("patch_embed", "cls_token", "pos_embed")) else v for k, v in sd.items()}
        model.load_state_dict(sd)
    reference.load_state_dict(_paper_state_dict(sd))
    model, reference = model.double().eval(), reference.double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64) * (1e-3 if small else 1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["covit_d2_e512_p4_32", "vit_d2_e512_p4_32"])
def test_initialisation_follows_the_public_code(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    # torch.randn class token and position embedding (timm: 1e-6 and 0.02)
    assert float(model.pos_embed.detach().std()) == pytest.approx(1.0, abs=0.02)
    assert float(model.cls_token.detach().std()) == pytest.approx(1.0, abs=0.1)
    # PyTorch's default Linear init: weights and biases uniform in +-1/sqrt(fan_in) (timm: a
    # truncated normal of std 0.02 and zero biases)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            bound = mod.in_features ** -0.5
            for p in (mod.weight, mod.bias):
                assert float(p.detach().abs().max()) <= bound, mod_name
                assert float(p.detach().abs().max()) > 0.9 * bound, mod_name
            assert float(mod.weight.detach().std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05), mod_name
    assert all(m.eps == CV.LAYER_NORM_EPS == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
