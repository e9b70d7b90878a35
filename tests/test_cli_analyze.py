"""`python -m advvit.analyze` end to end on tiny checkpoints and a tiny idx data set."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import advvit  # noqa: F401  (before timm)
from advvit import analyze as A
from advvit.cli.analyses import _spatial_grid
from advvit import checkpoint as C
from advvit import data as D
from advvit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
MEAN_STD = ((0.3,), (0.4,))
SIZE = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = 0x08  # unsigned bytes
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _patterns(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes of bars on a black background (saturated pixels, like Fashion-MNIST)."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for i, c in enumerate(y):
        if c < 5:
            x[i, 2 + 3 * c: 4 + 3 * c, 2:14] = 1.0      # a horizontal bar per row position
        else:
            x[i, 2:14, 2 + 3 * (c - 5): 4 + 3 * (c - 5)] = 1.0
    x = np.clip(x * g.uniform(0.6, 1.0, (n, 1, 1)) + g.normal(0, 0.05, x.shape) * (x > 0), 0, 1)
    return (x * 255).round().astype(np.uint8), y.astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST-format folder (idx files) of 16x16 synthetic images."""
    folder = tmp_path_factory.mktemp("idx")
    for split, n, seed in (("train", 400, 0), ("t10k", 60, 1)):
        images, labels = _patterns(n, seed)
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def _train_checkpoint(path: Path, data_dir: Path, arch: str, seed: int, steps: int,
                      **model_args) -> Path:
    torch.manual_seed(seed)
    train = D.create_dataset("fashion_mnist", data_dir, split="train")
    loader = D.create_loader(train, img_size=SIZE, in_chans=1, batch_size=50, is_training=False)
    model = create_model(arch, num_classes=10, in_chans=1, img_size=SIZE, normalize=MEAN_STD,
                         **model_args)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    spec = C.ModelSpec(arch, 10, 1, SIZE, MEAN_STD, dict(model_args))
    C.save_checkpoint(path, C.make_checkpoint(
        model, spec, config={"dataset": "fashion_mnist", "data_dir": str(data_dir)}, epoch=1,
        step=steps, train_norm="linf", train_eps=8 / 255))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """Two tiny ViTs (4x4 patches) trained for a few steps, in folders a/ and b/."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "a").mkdir()
    (root / "b").mkdir()
    return (_train_checkpoint(root / "a" / "best.pth", data_dir, "test_vit", 0, 24, patch_size=4),
            _train_checkpoint(root / "b" / "best.pth", data_dir, "test_vit", 1, 8, patch_size=4))


def _args(analysis: str, ckpts, data_dir: Path, out: Path, *extra: str) -> list[str]:
    args = [analysis]
    for c in ckpts:
        args += ["--checkpoint", str(c)]
    return args + ["--dataset", "fashion_mnist", "--data-dir", str(data_dir), "--device", "cpu",
                   "--batch-size", "8", "--output", str(out), *extra]


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        A.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# -------------------------------------------------------------------------------- end to end

FAST = {
    "perturbations": ["--n-examples", "5", "--steps", "3", "--show", "4"],
    "class-viz": ["--steps", "3", "--classes", "0,Trouser,9"],
    "semantic": ["--n-examples", "12", "--steps", "3"],
    "transfer": ["--n-examples", "12", "--steps", "3"],
    "jacobian": ["--n-examples", "3", "--steps", "5"],
    "propagation": ["--n-examples", "4", "--steps", "2"],
    "similarity": ["--n-examples", "6"],
    "lesions": ["--n-examples", "6", "--steps", "2", "--kinds", "attn,block"],
}

FIGURES = {"class-viz": ["class_viz.png"],
           "similarity": ["similarity.png", "similarity_correlation.png"]}  # CKA and correlation
"""Each analysis's figure files where they are not just ``<analysis>.png``."""


@pytest.mark.slow
@pytest.mark.parametrize("analysis", list(FAST))
def test_every_analysis_end_to_end(analysis, ckpts, data_dir, tmp_path, capsys):
    out = tmp_path / "out" / analysis  # missing folders are created
    assert A.main(_args(analysis, ckpts, data_dir, out, *FAST[analysis])) == 0
    report = json.loads((out / f"{analysis}.json").read_text())
    assert report["format"] == A.ANALYZE_FORMAT and report["analysis"] == analysis
    assert report["model_names"] == ["a/best", "b/best"]
    assert [m["sha256"] for m in report["models"]] == \
        [hashlib.sha256(c.read_bytes()).hexdigest() for c in ckpts]
    assert report["seed"] == 0 and {"torch", "timm", "advvit"} <= set(report["versions"])
    assert report["data"]["dataset"] == "fashion_mnist"
    assert report["data"]["classes"][1] == "Trouser"  # class names from the data set
    assert report["results"]
    assert [f["file"] for f in report["figures"]] == FIGURES.get(analysis, [f"{analysis}.png"])
    _pngs_open(out, report)
    assert f"({analysis}.json)" in (out / "report.md").read_text()
    if analysis in ("perturbations", "class-viz", "semantic", "transfer"):
        assert "images/s" in capsys.readouterr().err  # progress on the attack work


def test_similarity_figures_draw_cka_and_correlation():
    from advvit.analysis.internals import LayerSimilarity, SimilarityMatrices
    from advvit.plots import pyplot, similarity_figure
    g = torch.Generator().manual_seed(0)

    def matrices(low: float) -> SimilarityMatrices:
        rand = lambda: torch.rand(3, 3, generator=g, dtype=torch.float64)  # noqa: E731
        corr = low + (1 - low) * rand()
        corr[0, 1] = math.nan  # outputs of different shapes: a blank cell
        return SimilarityMatrices(correlation=corr, cka=rand())

    def similarities(low: float) -> tuple[LayerSimilarity, LayerSimilarity]:
        return tuple(LayerSimilarity(blocks=("b0", "b1", "b2"), tokens=matrices(low),
                                     class_token=matrices(low), n=4) for _ in range(2))
    ctx = SimpleNamespace(models=[None, None], plt=pyplot())
    # the colour scale is CKA's 0..1, and -1..1 only where a correlation is negative
    for measure, low, vmin in (("cka", -1, 0), ("correlation", -1, -1), ("correlation", 0.2, 0)):
        a, b = similarities(low)
        fig = similarity_figure({"a": a, "b": b}, measure)
        shown = [ax.images[0] for ax in fig.axes if ax.images]  # colour bars hold no image
        # rows: all tokens, class token; a column per model (axes in row-major order)
        want = [getattr(s, measure) for s in (a.tokens, b.tokens, a.class_token, b.class_token)]
        assert len(shown) == 4
        for image, matrix in zip(shown, want):
            assert np.allclose(image.get_array(), matrix.numpy(), equal_nan=True)
            assert image.get_clim() == (vmin, 1)
        ctx.plt.close(fig)


# Tiny models of each architecture, the sizes of tests/test_analysis_blocks.py's but by timm
# name, so that a checkpoint rebuilds them: 16x16 grey inputs, width 16, 2 blocks (+ class
# attention).
_WIDTH16 = dict(embed_dim=16, num_heads=2)
TINY_ARCHS = {
    "vit": ("vit_tiny_patch16_224", dict(patch_size=4, depth=2, **_WIDTH16), ["blocks.0", "blocks.1"]),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(patch_size=4, depth=2, **_WIDTH16),
                       ["blocks.0", "blocks.1"]),
    "cait": ("cait_xxs24_224", dict(patch_size=4, depth=2, depth_token_only=1, **_WIDTH16),
             ["blocks.0", "blocks.1", "blocks_token_only.0"]),
    "xcit": ("xcit_nano_12_p8_32", dict(depth=2, cls_attn_layers=1, **_WIDTH16),
             ["blocks.0", "blocks.1", "cls_attn_blocks.0"]),
    "resnet": ("test_resnet", dict(channels=(8, 16, 16, 16), stem_width=8),  # Basic and Bottleneck
               ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
    "fan": ("fan_tiny_12_p4_32", dict(depth=2, cls_attn_layers=1, **_WIDTH16),
            ["blocks.0", "blocks.1", "cls_attn_blocks.0"]),
    "fan-hybrid": ("fan_tiny_8_p4_hybrid", dict(depth=1, cls_attn_layers=1, hybrid_depths=(1, 1),
                                                hybrid_dims=(4, 8), hybrid_stem_stride=1, **_WIDTH16),
                   ["patch_embed.backbone.stages.0.blocks.0", "patch_embed.backbone.stages.1.blocks.0",
                    "blocks.0", "cls_attn_blocks.0"]),
    "covit": ("covit_d2_e128_p4_32", dict(kernel_sizes=((3, 5), (1, 3)), **_WIDTH16),
              ["blocks.0", "blocks.1"]),
}
"""name -> (timm name, its arguments, the blocks advvit.analysis.blocks lists, in order)."""

BLOCK_ANALYSES = {
    "jacobian": ["--n-examples", "4", "--steps", "3"],
    "propagation": ["--n-examples", "4", "--steps", "2"],
    "similarity": ["--n-examples", "4"],
    "lesions": ["--n-examples", "4", "--steps", "1"],
}


def _finite(values) -> np.ndarray:
    """A JSON list of numbers as a float array, checked finite (a null, JSON's NaN, fails)."""
    array = np.asarray(values, dtype=float)
    assert np.isfinite(array).all(), array
    return array


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_block_analyses_end_to_end_on_every_supported_architecture(arch, data_dir, tmp_path):
    from advvit.analysis import blocks
    timm_name, model_args, names = TINY_ARCHS[arch]
    ckpt = _train_checkpoint(tmp_path / "tiny.pth", data_dir, timm_name, 0, 2, **model_args)
    found = blocks(C.create_model_from_checkpoint(ckpt)[0])
    assert [b.name for b in found] == names
    L = len(names)
    results = {}
    for analysis, extra in BLOCK_ANALYSES.items():
        out = tmp_path / analysis
        assert A.main(_args(analysis, [ckpt], data_dir, out, *extra)) == 0
        report = json.loads((out / f"{analysis}.json").read_text())
        assert [f["file"] for f in report["figures"]] == FIGURES.get(analysis, [f"{analysis}.png"])
        _pngs_open(out, report)
        (results[analysis],) = report["results"].values()
        assert results[analysis]["blocks"] == names  # one entry per block, in forward order

    jac = results["jacobian"]
    assert _finite(jac["sigma_mean"]).shape == (L,) and (np.asarray(jac["sigma_mean"]) > 0).all()
    assert _finite(jac["sigma_std"]).shape == (L,)
    # 1 to --steps power steps per block and path (class-token blocks: also all tokens), one batch
    paths = len(jac["paths"]) + jac["paths"].count("class-token")
    assert paths <= jac["jvp_passes"] <= 3 * paths
    assert _finite(jac["sigma_all_tokens_mean"]).shape == (L,) and 0 <= jac["converged_all_tokens"] <= 1
    assert jac["paths"] == ["class-token" if b.layout.class_token_update else "all-tokens" for b in found]

    effects = results["propagation"]["effects"]
    assert list(effects) == ["fgsm", "random(fgsm)", "pgd-2", "random(pgd-2)"]
    for e in effects.values():
        assert _finite(e["mean"]).shape == (L,) and (np.asarray(e["mean"]) > 0).all()

    sim = results["similarity"]
    for measure in ("cka", "correlation"):
        tokens = _finite(np.diag(np.asarray(sim["tokens"][measure], dtype=float)))
        assert tokens == pytest.approx(np.ones(L))  # each block's output with itself
    cka = _finite(sim["tokens"]["cka"])  # every pair of blocks has a CKA, whatever the shapes
    assert cka.shape == (L, L) and np.allclose(cka, cka.T)
    has_class_token = [b.class_token is not None for b in found]
    assert np.isfinite(np.diag(np.asarray(sim["class_token"]["cka"], dtype=float))).tolist() \
        == has_class_token

    les = results["lesions"]
    kinds = list(dict.fromkeys(k for b in found for k in b.lesion_kinds))
    assert les["kinds"] == kinds
    assert [(r["kind"], r["block"]) for r in les["rows"]] == \
        [(k, b.name) for k in kinds for b in found if k in b.lesion_kinds]
    accuracies = [r[key] for r in les["rows"] for key in ("clean", "robust")]
    assert all(0 <= a <= 1 for a in accuracies + [les["baseline_clean"], les["baseline_robust"]])


@pytest.mark.slow
def test_perturbations_numbers_and_one_column_block_per_model(ckpts, data_dir, tmp_path):
    both, one = tmp_path / "both", tmp_path / "one"
    assert A.main(_args("perturbations", ckpts, data_dir, both, *FAST["perturbations"])) == 0
    assert A.main(_args("perturbations", ckpts[:1], data_dir, one, *FAST["perturbations"])) == 0
    r2 = json.loads((both / "perturbations.json").read_text())
    r1 = json.loads((one / "perturbations.json").read_text())
    # the same model, seed and images give the same numbers alone or beside another model
    assert r2["results"]["a/best"] == r1["results"]["best"]
    assert r1["settings"]["eps"] == pytest.approx(8 / 255)  # the checkpoint's training eps
    assert "training eps" in r1["settings"]["eps_source"]
    w1, w2 = r1["figures"][0]["width"], r2["figures"][0]["width"]
    assert w2 > 1.5 * w1  # one more block of three image columns
    model, _ = C.create_model_from_checkpoint(ckpts[0])
    ds = D.create_dataset("fashion_mnist", data_dir, split="val")
    x, y = next(iter(D.create_loader(ds.subset(list(range(5))), img_size=SIZE, in_chans=1,
                                     batch_size=5, is_training=False)))
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean().item()
    assert r1["results"]["best"]["clean_accuracy"] == pytest.approx(clean)
    assert r1["results"]["best"]["labels"] == y.tolist()


@pytest.mark.slow
def test_console_script_and_module_entry_point(ckpts, data_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "advvit.analyze", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    listed = [line.split()[0] for line in run.stdout.splitlines() if line.startswith("    ")]
    assert listed == list(A.ANALYSES)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'advvit-analyze = "advvit.analyze:main"' in pyproject


# ------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("analysis,extra,match", [
    ("perturbations", ["--eps", "2"], "above 1"),
    ("class-viz", ["--eps", "100"], "L2 diagonal"),
    ("similarity", ["--n-examples", "1"], "too few for similarity"),
    ("transfer", ["--n-examples", "100"], "more than the 60 examples"),
    ("jacobian", ["--eps", "4/255"], "do not apply to jacobian"),
    ("class-viz", ["--classes", "0,giraffe"], "--classes 'giraffe'"),
    ("class-viz", ["--n-examples", "4"], "--n-examples does not apply"),
    ("lesions", ["--kinds", "lpi"], "--kinds lpi"),
    ("perturbations", ["--steps", "0"], "--steps must be >= 1"),
    ("transfer", ["--attack", "fgsm", "--steps", "5"], "fgsm is one step"),
])
def test_bad_input_exits_2_with_its_message_before_any_work(analysis, extra, match, ckpts,
                                                           data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    err = _fails(_args(analysis, ckpts[:1], data_dir, out, *extra), capsys)
    assert match in err
    assert not out.exists()  # nothing was written


def test_unknown_analysis_is_refused(ckpts, data_dir, tmp_path, capsys):
    err = _fails(_args("saliency", ckpts[:1], data_dir, tmp_path / "o"), capsys)
    assert "invalid choice: 'saliency'" in err and "perturbations" in err


def test_checkpoint_that_does_not_load_is_refused(ckpts, data_dir, tmp_path, capsys):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    err = _fails(_args("transfer", [ckpts[0], broken], data_dir, tmp_path / "o"), capsys)
    assert "--checkpoint" in err and "broken.pth" in err
    err = _fails(_args("transfer", [tmp_path / "missing.pth"], data_dir, tmp_path / "o"), capsys)
    assert "missing.pth does not exist" in err


def test_a_folder_or_non_finite_weights_are_refused_for_every_model_option(ckpts, data_dir, tmp_path,
                                                                           capsys):
    folder = ckpts[0].parent
    err = _fails(_args("semantic", [ckpts[0]], data_dir, tmp_path / "o", "--judge", str(folder)), capsys)
    assert f"--judge {folder} is a folder" in err and str(folder / "best.pth") in err
    err = _fails(_args("transfer", [ckpts[0], folder], data_dir, tmp_path / "o"), capsys)
    assert f"--checkpoint {folder} is a folder" in err
    ckpt = C.load_checkpoint(ckpts[0])
    next(iter(ckpt["model"].values())).view(-1)[0] = float("nan")
    nan = tmp_path / "nan.pth"
    C.save_checkpoint(nan, ckpt)
    err = _fails(_args("corruptions", ckpts[:1], data_dir, tmp_path / "o", "--baseline", str(nan)), capsys)
    assert f"--baseline: {nan} (model): 1 non-finite value (NaN or infinite)" in err
    assert not (tmp_path / "o").exists()


def test_model_without_blocks_is_refused_by_the_internals_analyses(data_dir, tmp_path, capsys):
    cnn = _train_checkpoint(tmp_path / "effnet.pth", data_dir, "test_efficientnet", 0, 1)
    for analysis in ("jacobian", "propagation", "similarity", "lesions"):
        err = _fails(_args(analysis, [cnn], data_dir, tmp_path / "o"), capsys)
        assert "EfficientNet" in err and f"{analysis} looks inside the model" in err
    assert not (tmp_path / "o").exists()


def test_model_names_are_short_and_distinct():
    assert A._model_names(["/r/a/best.pth", "/r/b/best.pth"]) == ["a/best", "b/best"]
    assert A._model_names(["/r/x.pth", "/r/y.pth"]) == ["x", "y"]
    assert A._model_names(["/r/a/best.pth", "/r/a/best.pth"]) == ["best#0", "best#1"]  # no "//r"


def test_a_new_analysis_is_one_registration(ckpts, data_dir, tmp_path):
    calls = []

    @A.register("mean-pixel", "the mean pixel of the examples", eps=None)
    def _mean(ctx: A.Context) -> A.Output:
        calls.append(len(ctx.y))
        return A.Output(settings={}, results={"mean": float(ctx.x.mean())})
    try:
        assert A.main(_args("mean-pixel", ckpts[:1], data_dir, tmp_path / "o",
                            "--n-examples", "3")) == 0
        report = json.loads((tmp_path / "o" / "mean-pixel.json").read_text())
        assert calls == [3] and 0 < report["results"]["mean"] < 1
    finally:
        del A.ANALYSES["mean-pixel"]


@pytest.mark.slow
def test_a_default_example_count_is_capped_at_the_split(ckpts, data_dir, tmp_path):
    # similarity's default is 64 examples; the split has 60: all 60 are used, without error
    assert A.main(_args("similarity", ckpts[:1], data_dir, tmp_path / "o")) == 0
    report = json.loads((tmp_path / "o" / "similarity.json").read_text())
    assert report["data"]["n_examples"] == 60 and report["data"]["indices"] == list(range(60))


def test_reports_are_strict_json():
    from advvit.report import markdown_table, to_jsonable
    value = to_jsonable({"m": torch.tensor([[1.0, float("nan")]]), "t": (1, float("inf")),
                         "p": Path("a/b")})
    assert json.loads(json.dumps(value, allow_nan=False)) == \
        {"m": [[1.0, None]], "t": [1, None], "p": "a/b"}
    assert markdown_table(["a"], [[float("nan")]]).splitlines()[-1] == "| n/a |"


# ------------------------------------------------------------- corruptions and spatial grids

CORRUPT = ["--corruptions", "gaussian_noise,contrast", "--severities", "1,5",
           "--corruption-workers", "0", "--n-examples", "8"]
SPATIAL = ["--max-rotation", "20", "--rotation-steps", "3", "--translation-steps", "3",
           "--n-examples", "6"]


def _pngs_open(out: Path, report: dict) -> None:
    for figure in report["figures"]:
        with Image.open(out / figure["file"]) as png:
            assert png.format == "PNG" and png.size == (figure["width"], figure["height"])
    md = (out / "report.md").read_text()
    assert all(f"]({f['file']})" in md for f in report["figures"]) and "| " in md


@pytest.mark.slow
def test_corruptions_end_to_end_with_a_baseline(ckpts, data_dir, tmp_path, capsys):
    from advvit.analysis.shifts import CorruptionCache, corrupt
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = _args("corruptions", ckpts, data_dir, out, *CORRUPT, "--baseline", str(ckpts[0]),
                 "--cache-dir", str(cache))
    assert A.main(argv) == 0
    report = json.loads((out / "corruptions.json").read_text())
    assert report["analysis"] == "corruptions" and report["settings"]["eps"] is None
    assert report["settings"]["baseline"]["sha256"] == hashlib.sha256(ckpts[0].read_bytes()).hexdigest()
    # the baseline is one of the models: named as that model, listed once
    assert report["settings"]["baseline"]["name"] == "a/best"
    assert "(baseline)" not in (out / "report.md").read_text()
    a, b = report["results"]["models"]["a/best"], report["results"]["models"]["b/best"]
    assert a["corruptions"] == ["gaussian_noise", "contrast"] and a["severities"] == [1, 5]
    assert a["mce_percent"] == 100.0 and a["ce_percent"] == {"gaussian_noise": 100.0, "contrast": 100.0}
    # b's mCE from the JSON's own accuracies, by Hendrycks & Dietterich's formula
    ce = {c: 100 * sum(1 - v for v in b["accuracy"][c]) / sum(1 - v for v in a["accuracy"][c])
          for c in a["corruptions"]}
    assert b["ce_percent"] == pytest.approx(ce) and b["mce_percent"] == pytest.approx(np.mean(list(ce.values())))
    assert report["results"]["baseline"]["accuracy"] == a["accuracy"]
    # the numbers are the model's accuracy on the corrupted examples
    model, _ = C.create_model_from_checkpoint(ckpts[0])
    ds = D.create_dataset("fashion_mnist", data_dir, split="val")
    x, y = next(iter(D.create_loader(ds.subset(list(range(8))), img_size=SIZE, in_chans=1,
                                     batch_size=8, is_training=False)))
    with torch.no_grad():
        hit = (model(corrupt(x, "contrast", 5, seed=0)).argmax(1) == y).double().mean().item()
    assert a["accuracy"]["contrast"][1] == pytest.approx(hit)
    assert a["mean_corruption_accuracy"] == pytest.approx(np.mean([v for c in a["accuracy"].values() for v in c]))
    assert [f["file"] for f in report["figures"]] == ["corruptions.png", "corruptions_summary.png"]
    _pngs_open(out, report)
    assert "mCE (%)" in (out / "report.md").read_text()
    assert "images/s" in capsys.readouterr().err
    # generated once: 4 (corruption, severity) files, reused by a second run
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.glob("*.npy")) == sorted(
        f"{c}-{s}-seed0.npy" for c in ("gaussian_noise", "contrast") for s in (1, 5))
    assert CorruptionCache(cache).folder("fashion_mnist/val", json.loads(
        (folder / "manifest.json").read_text())["examples"]["sha256"]) == folder
    assert A.main(argv) == 0
    again = json.loads((out / "corruptions.json").read_text())
    assert again["results"]["models"] == report["results"]["models"]


@pytest.mark.slow
def test_spatial_end_to_end(ckpts, data_dir, tmp_path):
    from advvit.analysis.shifts import SpatialGrid, evaluate_spatial
    out = tmp_path / "out"
    assert A.main(_args("spatial", ckpts, data_dir, out, *SPATIAL)) == 0
    report = json.loads((out / "spatial.json").read_text())
    r = report["results"]["a/best"]
    assert r["rotations"] == [-20.0, 0.0, 20.0] and r["translations_x"] == [-0.1, 0.0, 0.1]
    assert report["settings"]["points"] == 27 and np.asarray(r["accuracy"]).shape == (3, 3, 3)
    assert r["accuracy"][1][1][1] == r["clean_accuracy"]  # the identity point
    assert r["worst_of_grid_accuracy"] <= r["lowest_point"]["accuracy"] == np.min(r["accuracy"])
    model, _ = C.create_model_from_checkpoint(ckpts[0])
    ds = D.create_dataset("fashion_mnist", data_dir, split="val")
    x, y = next(iter(D.create_loader(ds.subset(list(range(6))), img_size=SIZE, in_chans=1,
                                     batch_size=6, is_training=False)))
    direct = evaluate_spatial(model, x, y, grid=SpatialGrid((-20.0, 0.0, 20.0), (-0.1, 0.0, 0.1),
                                                            (-0.1, 0.0, 0.1)))
    assert r["accuracy"] == direct.accuracy.tolist()
    assert r["worst_of_grid_accuracy"] == direct.worst_of_grid_accuracy
    assert [f["file"] for f in report["figures"]] == ["spatial.png", "spatial_summary.png"]
    _pngs_open(out, report)


def test_default_spatial_grid_is_engstroms(ckpts, data_dir, tmp_path):
    from advvit.analysis.shifts import SpatialGrid
    args = A.build_parser().parse_args(_args("spatial", ckpts[:1], data_dir, tmp_path))
    grid = _spatial_grid(SimpleNamespace(args=args))
    assert grid == SpatialGrid() and grid.shape == (31, 5, 5)
    assert grid.translations_x == pytest.approx(SpatialGrid().translations_x)


@pytest.fixture(scope="module")
def twelve_classes(tmp_path_factory) -> Path:
    """An untrained 12-class ViT of the same input as the tiny checkpoints (labels 0-9 fit it)."""
    model = create_model("test_vit", num_classes=12, in_chans=1, img_size=SIZE, patch_size=4)
    path = tmp_path_factory.mktemp("twelve") / "twelve.pth"
    C.save_checkpoint(path, C.make_checkpoint(model, C.ModelSpec("test_vit", 12, 1, SIZE, None,
                                                                 {"patch_size": 4}),
                                              config={}, epoch=0, step=0))
    return path


@pytest.mark.parametrize("analysis,extra,match", [
    ("corruptions", ["--corruptions", "gaussian_noise,rain"], "--corruptions rain is unknown"),
    ("corruptions", ["--severities", "1,6"], "--severities 6: severities are integers 1 to 5"),
    ("corruptions", ["--severities", "0"], "--severities 0"),
    ("corruptions", ["--corruptions", "fog,fog"], "names a corruption twice"),
    ("corruptions", ["--corruption-workers", "-1"], "--corruption-workers must be >= 0"),
    ("corruptions", ["--eps", "4/255"], "do not apply to corruptions"),
    ("corruptions", ["--cache-dir", "/proc/version"], "--cache-dir /proc/version is a file"),
    ("spatial", ["--rotation-steps", "0"], "--rotation-steps must be >= 1"),
    ("spatial", ["--translation-steps", "0"], "--translation-steps must be >= 1"),
    ("spatial", ["--max-rotation", "200"], "--max-rotation must be in [0, 180]"),
    ("spatial", ["--max-translation", "0", "--translation-steps", "3"], "--max-translation 0 has one value"),
])
def test_shift_analyses_refuse_bad_input_before_any_work(analysis, extra, match, ckpts, data_dir,
                                                         tmp_path, capsys):
    out, cache = tmp_path / "never", tmp_path / "cache"
    more = ["--cache-dir", str(cache)] if analysis == "corruptions" and "--cache-dir" not in extra else []
    err = _fails(_args(analysis, ckpts[:1], data_dir, out, *more, *extra), capsys)
    assert match in err
    assert not out.exists() and not cache.exists()


def test_a_baseline_with_other_classes_is_refused(ckpts, data_dir, twelve_classes, tmp_path, capsys):
    out = tmp_path / "never"
    err = _fails(_args("corruptions", ckpts[:1], data_dir, out, *CORRUPT, "--cache-dir",
                       str(tmp_path / "cache"), "--baseline", str(twelve_classes)), capsys)
    assert "--baseline" in err and "has 12 classes" in err and "has 10" in err
    assert not out.exists()
    err = _fails(_args("corruptions", ckpts[:1], data_dir, out, "--baseline",
                       str(tmp_path / "missing.pth")), capsys)
    assert "--baseline" in err and "missing.pth does not exist" in err
