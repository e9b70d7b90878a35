"""advvit.analysis.shifts: ImageNet-C corruptions, their cache and mCE, and spatial grids: known answers."""
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import advvit  # noqa: F401  (before torchvision: the torchvision guard)
from advvit.analysis import _corruption_compat as compat
from advvit.analysis import shifts
from advvit.analysis.shifts import (
    CORRUPTIONS, SEVERITIES, CorruptionAccuracy, CorruptionCache, SpatialGrid, corrupt, evaluate_corruptions,
    evaluate_spatial, generate_corruptions, mean_corruption_error, spatial_transform)
from advvit.data import read_examples as load_examples
from advvit.data import DataNotFoundError, create_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# Corruptions whose result depends on the seed (the others are deterministic filters).
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}


@pytest.fixture(scope="module")
def fmnist():
    """Two real Fashion-MNIST test images of each class (20, balanced): uint8 (20, 1, 28, 28), labels."""
    try:
        ds = create_dataset("fashion_mnist", split="test")
    except DataNotFoundError as err:
        pytest.skip(f"needs the real Fashion-MNIST (apt-get install dataset-fashion-mnist): {err}")
    targets = np.asarray(ds.targets)
    idx = [int(i) for c in range(10) for i in np.flatnonzero(targets == c)[:2]]
    return load_examples(ds, idx)


@pytest.fixture(scope="module")
def colour(fmnist):
    """32x32 colour images: the Fashion-MNIST ones padded by 2 and tinted differently per channel."""
    x = torch.nn.functional.pad(fmnist[0][:6].float(), (2, 2, 2, 2))
    tint = torch.tensor([1.0, 0.7, 0.4]).view(1, 3, 1, 1)
    return (x * tint).round().to(torch.uint8)


def test_load_examples_reads_pil_data_sets_as_uint8_nchw():
    from PIL import Image
    rgb = np.arange(2 * 5 * 6 * 3, dtype=np.uint8).reshape(2, 5, 6, 3)
    pairs = [(Image.fromarray(rgb[0]), 4), (Image.fromarray(rgb[1]), 7)]
    x, y = load_examples(pairs, [1, 0])
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(rgb[[1, 0]]).permute(0, 3, 1, 2))
    assert y.tolist() == [7, 4]
    with pytest.raises(ValueError, match="different sizes"):
        load_examples(pairs + [(Image.fromarray(rgb[0, :4]), 1)])


def _change(a, b):
    return float((a.float() - b.float()).abs().mean() / 255)


# --------------------------------------------------------------------------------- the library

def test_the_names_are_the_librarys_15_common_corruptions_in_imagenet_c_order():
    assert CORRUPTIONS == compat.corruption_names() and len(CORRUPTIONS) == 15
    assert compat.library_version().startswith("imagecorruptions-imaug ")


def test_glass_blurs_jit_function_is_cached_on_disk():
    # Without the cache every new (worker) process compiles it again: ~4 s.
    impl = sys.modules[compat.library().__name__ + ".corruptions"]
    assert type(impl._shuffle_pixels_njit_glass_blur._cache).__name__ != "NullCache"


def test_frost_keeps_its_decoded_photographs_with_identical_results_and_opencv_untouched(fmnist, monkeypatch):
    import cv2
    impl = sys.modules[compat.library().__name__ + ".corruptions"]
    assert isinstance(impl.cv2, compat._OpenCVKeepingImages) and cv2.imread is impl.cv2._cv2.imread
    x = fmnist[0][:4]
    kept = [corrupt(x, "frost", s, seed=2) for s in SEVERITIES]
    first = impl.cv2.imread(impl.__file__.replace("corruptions.py", "frost/frost2.png"))
    first[:] = 0  # a caller's change does not reach the kept photograph
    assert impl.cv2.imread(impl.__file__.replace("corruptions.py", "frost/frost2.png")).any()
    monkeypatch.setattr(impl, "cv2", cv2)  # the library as published: decoding every call
    assert all(torch.equal(k, corrupt(x, "frost", s, seed=2)) for k, s in zip(kept, SEVERITIES))


def test_frost_draws_from_imagenet_cs_five_photographs_only(fmnist, monkeypatch):
    from PIL import Image
    impl = sys.modules[compat.library().__name__ + ".corruptions"]
    read, kept_read = [], impl.cv2.imread
    monkeypatch.setattr(impl.cv2, "imread", lambda path, *a: read.append(Path(path).name) or kept_read(path, *a))
    image = np.repeat(fmnist[0][0].permute(1, 2, 0).numpy(), 3, axis=-1)
    release_sixth = 0
    for seed in range(60):
        out = compat.apply(image, "frost", 3, seed)
        # The release draws its photograph first, from all six: randint(6) after seeding.
        if np.random.RandomState(seed).randint(6) == 5:
            release_sixth += 1
        else:  # a seed drawing one of the five gives the release's own result
            np.random.seed(seed)
            assert np.array_equal(out, np.uint8(impl.frost(Image.fromarray(image), 3))), seed
    assert release_sixth > 0  # the release would have used the sixth photograph for these
    used = set(read)
    assert used == {"frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"}, used
    assert compat.library_version().endswith("(frost: 5 photographs)")


def test_a_missing_library_says_how_to_install_it(monkeypatch):
    compat.library.cache_clear()
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    try:
        with pytest.raises(compat.CorruptionLibraryMissing, match=r"advvit\[corruptions\]"):
            corrupt(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "fog", 1)
    finally:
        compat.library.cache_clear()


# ------------------------------------------------------------------------------- corrupt()

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grey28", "colour32"])
def test_every_corruption_at_every_severity_keeps_shape_dtype_and_range_and_repeats_for_a_seed(kind, fmnist,
                                                                                               colour):
    x = fmnist[0][:3] if kind == "grey28" else colour[:3]
    xf = x.float() / 255
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            out = corrupt(x, name, severity, seed=7)
            assert out.shape == x.shape and out.dtype == torch.uint8, (name, severity)
            assert torch.equal(out, corrupt(x, name, severity, seed=7)), (name, severity)
            outf = corrupt(xf, name, severity, seed=7)
            assert outf.dtype == torch.float32 and outf.shape == x.shape
            assert 0.0 <= float(outf.min()) and float(outf.max()) <= 1.0
            assert torch.equal((outf * 255).round().to(torch.uint8), out), (name, severity)
            if name in RANDOM:
                assert not torch.equal(out, corrupt(x, name, severity, seed=8)), (name, severity)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_5_changes_real_fashion_mnist_more_than_severity_1(name, fmnist):
    x = fmnist[0]
    weak, strong = _change(corrupt(x, name, 1), x), _change(corrupt(x, name, 5), x)
    assert 0.0 < weak < strong, (name, weak, strong)


def test_an_image_is_corrupted_alike_in_any_batch_and_the_callers_rng_is_untouched(fmnist):
    x = fmnist[0][:6]
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    whole = corrupt(x, "snow", 3, seed=1)
    assert np.random.random() == expected_next
    np.random.seed(999)  # another global state: the same corruption
    assert torch.equal(corrupt(x[2:5], "snow", 3, seed=1), whole[2:5])
    assert torch.equal(corrupt(x[4], "snow", 3, seed=1), whole[4])  # (C, H, W)


def test_grey_images_get_the_first_channel_of_the_rgb_corruption(fmnist):
    x = fmnist[0][:2]
    rgb = compat.apply(np.repeat(x[0].permute(1, 2, 0).numpy(), 3, axis=-1), "contrast", 2, seed=0)
    # contrast treats channels alike: every channel equals the grey result
    out = corrupt(x, "contrast", 2)[0, 0].numpy()
    assert all(np.array_equal(rgb[..., c], out) for c in range(3))


@pytest.mark.parametrize("bad, match", [
    (dict(name="haze"), "unknown corruption 'haze'"),
    (dict(severity=6), "severity must be an integer in 1..5"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(images=torch.full((1, 1, 8, 8), 1.5)), r"in \[0, 1\]"),
    (dict(images=torch.zeros(1, 2, 8, 8)), "C = 1 .grey. or 3"),
])
def test_bad_arguments_raise_one_clear_error(bad, match):
    args = dict(images=torch.zeros(1, 1, 28, 28), name="fog", severity=1, seed=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        corrupt(args["images"], args["name"], args["severity"], args["seed"])


def test_many_tasks_check_their_arguments_when_called_not_when_iterated(tmp_path):
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'haze'"):
        generate_corruptions(x, [("fog", 1), ("haze", 1)], workers=0)
    with pytest.raises(ValueError, match="workers must be None"):
        generate_corruptions(x, [("fog", 1)], workers=-1)
    with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
        CorruptionCache(tmp_path, workers=0).corrupted(x, [("fog", 0)])


@pytest.mark.slow
def test_two_worker_processes_give_what_this_process_gives(fmnist):
    x = fmnist[0][:10]
    tasks = [("glass_blur", 2), ("frost", 4), ("gaussian_noise", 5)]
    got = list(generate_corruptions(x, tasks, seed=3, workers=2))
    assert [t for t, _ in got] == tasks
    for (name, severity), out in got:
        assert torch.equal(out, corrupt(x, name, severity, seed=3)), name


# ------------------------------------------------------------------------------------ cache

def _cache_files(cache, x, dataset):
    folder = cache.folder(dataset, shifts._fingerprint(x))
    return folder, json.loads((folder / "manifest.json").read_text())


def test_a_cache_hit_returns_identical_tensors_without_generating(fmnist, tmp_path, monkeypatch):
    x = fmnist[0][:5]
    cache = CorruptionCache(tmp_path, workers=0)
    tasks = [("fog", 2), ("jpeg_compression", 5)]
    first = dict(cache.corrupted(x, tasks, dataset="fashion_mnist/test", seed=4))
    assert torch.equal(first[("fog", 2)], corrupt(x, "fog", 2, seed=4))

    def no_generation(*_args):
        raise AssertionError("generated again despite the cache")
    monkeypatch.setattr(shifts, "_corrupt_nhwc", no_generation)
    again = dict(cache.corrupted(x, tasks, dataset="fashion_mnist/test", seed=4))
    assert all(torch.equal(again[t], first[t]) and again[t].dtype == torch.uint8 for t in tasks)
    _, manifest = _cache_files(cache, x, "fashion_mnist/test")
    assert set(manifest["entries"]) == {"fog/2/4", "jpeg_compression/5/4"}
    assert manifest["examples"]["shape"] == [5, 1, 28, 28]


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "manifest"])
def test_a_damaged_cache_is_detected_and_rebuilt_not_trusted(damage, fmnist, tmp_path, caplog):
    x = fmnist[0][:4]
    cache = CorruptionCache(tmp_path, workers=0)
    expected = corrupt(x, "pixelate", 3, seed=0)
    list(cache.corrupted(x, [("pixelate", 3)], dataset="d"))
    folder, manifest = _cache_files(cache, x, "d")
    path = folder / manifest["entries"]["pixelate/3/0"]["file"]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip_a_byte":
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        (folder / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="advvit.analysis.shifts"):
        (_, got), = cache.corrupted(x, [("pixelate", 3)], dataset="d")
    assert torch.equal(got, expected)
    assert "generating it again" in caplog.text or "generated again" in caplog.text
    _, manifest = _cache_files(cache, x, "d")
    entry = manifest["entries"]["pixelate/3/0"]
    assert entry["sha256"] == shifts._sha256(path.read_bytes()) and entry["bytes"] == path.stat().st_size


def test_the_cache_key_holds_the_examples_and_seed(fmnist, tmp_path):
    x = fmnist[0][:4]
    cache = CorruptionCache(tmp_path, workers=0)
    (_, a), = cache.corrupted(x, [("shot_noise", 2)], dataset="d", seed=0)
    (_, b), = cache.corrupted(x, [("shot_noise", 2)], dataset="d", seed=1)
    (_, c), = cache.corrupted(x[:3], [("shot_noise", 2)], dataset="d", seed=0)
    assert not torch.equal(a, b) and torch.equal(c, a[:3])
    assert cache.folder("d", shifts._fingerprint(x)) != cache.folder("d", shifts._fingerprint(x[:3]))


# ------------------------------------------------------------------------------- evaluation

class Constant(nn.Module):
    def __init__(self, label, num_classes=10):
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(label), num_classes).float())

    def forward(self, x):
        return self.logits.expand(len(x), -1)


class NearestMean(nn.Module):
    """Nearest class mean of the given images: a real classifier (accurate on clean images, broken by
    large rotations), with no training."""

    def __init__(self, x, y):
        super().__init__()
        flat = x.float().div(255).flatten(1)
        self.register_buffer("means", torch.stack([flat[y == c].mean(0) for c in range(10)]))

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.means)


def _small_cnn(in_chans=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 10))


def test_a_constant_predictors_corruption_accuracy_is_chance(fmnist):
    x, y = fmnist  # two of each of the 10 classes
    r = evaluate_corruptions(Constant(3), x, y, corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
                             workers=0)
    assert r.clean_accuracy == 0.1 and r.mean_corruption_accuracy == pytest.approx(0.1)
    assert r.accuracy == {"gaussian_noise": (0.1, 0.1), "contrast": (0.1, 0.1)}


def test_the_mce_of_a_model_against_itself_is_100_percent(fmnist):
    x, y = fmnist
    r = evaluate_corruptions(NearestMean(x, y), x, y, corruptions=("defocus_blur", "fog", "impulse_noise"),
                             workers=0)
    assert all(0.0 < sum(r.error(c)) for c in r.corruptions)
    m = mean_corruption_error(r, r)
    assert m.mce_percent == pytest.approx(100.0) and all(v == pytest.approx(100.0) for v in m.ce_percent.values())


def test_evaluate_corruptions_accuracy_is_the_models_accuracy_on_the_corrupted_images(fmnist, tmp_path):
    x, y = fmnist
    model = _small_cnn(in_chans=3)
    r = evaluate_corruptions(model, x, y, corruptions=("motion_blur",), severities=(4,), seed=2,
                             cache=tmp_path, workers=0, in_chans=3, batch_size=7)
    with torch.no_grad():
        pred = model(corrupt(x, "motion_blur", 4, seed=2).float().div(255).expand(-1, 3, -1, -1)).argmax(1)
    assert r.accuracy["motion_blur"] == (float((pred == y).double().mean()),)
    assert r.to_dict()["accuracy"] == {"motion_blur": [r.accuracy["motion_blur"][0]]}
    # Per example: the one task's outcome, and the clean one, for pairing two models.
    assert r.tasks_correct == tuple((pred == y).long().tolist())
    with torch.no_grad():
        clean = model(x.float().div(255).expand(-1, 3, -1, -1)).argmax(1) == y
    assert r.clean_correct == tuple(clean.tolist())
    assert r.to_dict()["per_example"]["tasks"] == 1


def test_per_example_task_counts_sum_to_the_mean_corruption_accuracy(fmnist):
    x, y = fmnist
    r = evaluate_corruptions(NearestMean(x, y), x, y, corruptions=("defocus_blur", "fog"),
                             severities=(1, 3, 5), workers=0)
    assert len(r.tasks_correct) == len(x) and max(r.tasks_correct) <= 6
    assert sum(r.tasks_correct) / (6 * len(x)) == pytest.approx(r.mean_corruption_accuracy)
    assert sum(r.clean_correct) / len(x) == pytest.approx(r.clean_accuracy)


def _result(errors, **over):
    fields = dict(corruptions=tuple(errors), severities=(1, 2), clean_accuracy=1.0, n=10, seed=0,
                  examples_sha256="abc", library="lib 1")
    fields.update(over)
    return CorruptionAccuracy(accuracy={c: tuple(1 - e for e in es) for c, es in errors.items()}, **fields)


def test_the_mce_sums_errors_over_severities_per_corruption_then_averages():
    model = _result({"fog": (0.2, 0.4), "snow": (0.5, 0.5)})
    base = _result({"fog": (0.4, 0.8), "snow": (0.25, 0.25)})
    m = mean_corruption_error(model, base)
    assert m.ce_percent == pytest.approx({"fog": 50.0, "snow": 200.0}) and m.mce_percent == pytest.approx(125.0)


def test_the_mce_refuses_another_evaluation_or_an_errorless_baseline():
    model = _result({"fog": (0.2, 0.4)})
    with pytest.raises(ValueError, match="other examples_sha256"):
        mean_corruption_error(model, _result({"fog": (0.2, 0.4)}, examples_sha256="def"))
    with pytest.raises(ValueError, match="no error on fog"):
        mean_corruption_error(model, _result({"fog": (0.0, 0.0)}))


# ---------------------------------------------------------------------------------- spatial

def test_the_transform_rotates_counter_clockwise_and_translates_by_a_fraction_of_the_side():
    x = torch.rand(2, 3, 28, 28)
    assert spatial_transform(x, 0.0, 0.0, 0.0) is x
    assert torch.allclose(spatial_transform(x, 90.0, 0.0, 0.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    right = torch.zeros_like(x)
    right[..., 1:] = x[..., :-1]  # one pixel right, zero padding
    assert torch.allclose(spatial_transform(x, 0.0, 1 / 28, 0.0), right, atol=1e-5)
    down = torch.zeros_like(x)
    down[..., 2:, :] = x[..., :-2, :]
    assert torch.allclose(spatial_transform(x, 0.0, 0.0, 2 / 28), down, atol=1e-5)


def _bilinear_zero_padded(image, rotation, tx, ty):
    """Reference: each output pixel samples R^-1 (p - t) bilinearly, source pixels outside being 0.

    ``image`` ``(H, W)``; coordinates from the image centre, x right, y down, pixel centres at
    half-integers; R rotates counter-clockwise on screen.
    """
    h, w = image.shape
    a = np.radians(rotation)
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            px, py = j + 0.5 - w / 2 - tx * w, i + 0.5 - h / 2 - ty * h
            sx = np.cos(a) * px - np.sin(a) * py + w / 2 - 0.5  # source column, in pixel indices
            sy = np.sin(a) * px + np.cos(a) * py + h / 2 - 0.5
            c0, r0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - c0, sy - r0
            for r, c, weight in ((r0, c0, (1 - fy) * (1 - fx)), (r0, c0 + 1, (1 - fy) * fx),
                                 (r0 + 1, c0, fy * (1 - fx)), (r0 + 1, c0 + 1, fy * fx)):
                if 0 <= r < h and 0 <= c < w:
                    out[i, j] += weight * image[r, c]
    return out


@pytest.mark.parametrize("rotation,tx,ty", [(30.0, 0.1, 0.1), (-16.0, -0.05, 0.1), (7.0, 0.0, -0.1),
                                            (0.0, 0.5 / 28, 0.0)])
def test_the_transform_is_bilinear_with_plain_zero_padding_at_the_edge_too(rotation, tx, ty):
    torch.manual_seed(0)
    images = torch.cat([torch.ones(1, 1, 28, 28), torch.rand(2, 1, 28, 28)]).double()
    out = spatial_transform(images, rotation, tx, ty)
    for image, got in zip(images, out):
        want = _bilinear_zero_padded(image[0].numpy(), rotation, tx, ty)
        np.testing.assert_allclose(got[0].numpy(), want, atol=1e-9)
    ones = out[0, 0]
    edge = (ones > 1e-9) & (ones < 1 - 1e-9)
    assert int(edge.sum()) > 20  # the edge ring is in the comparison, not only the interior
    if rotation == 0.0:
        # Half a pixel right: the first column is half black, half image (not the quarter of a
        # transform that weights the zero-padded value by its coverage once more).
        assert torch.allclose(ones[:, 0], torch.full((28,), 0.5, dtype=torch.float64))


def test_a_grid_of_only_the_identity_gives_the_clean_accuracy(fmnist):
    x, y = fmnist
    model = NearestMean(x, y)
    r = evaluate_spatial(model, x, y, grid=SpatialGrid((0.0,), (0.0,), (0.0,)))
    clean = float(shifts._correct(model, x, y, 64, None).double().mean())
    assert clean > 0.5
    assert r.worst_of_grid_accuracy == r.clean_accuracy == r.accuracy_at(0.0, 0.0, 0.0) == clean


def test_each_grid_points_accuracy_is_the_accuracy_on_the_transformed_images_and_the_worst_is_below_all(fmnist):
    x, y = fmnist
    model = NearestMean(x, y)
    grid = SpatialGrid((-30.0, 0.0, 30.0), (-0.1, 0.1), (0.0, 0.1))
    r = evaluate_spatial(model, x, y, grid=grid, batch_size=6)
    xf = x.float() / 255
    with torch.no_grad():
        for angle, tx, ty in grid.points():
            direct = (model(spatial_transform(xf, angle, tx, ty)).argmax(1) == y).double().mean()
            assert r.accuracy_at(angle, tx, ty) == float(direct), (angle, tx, ty)
    assert r.accuracy.shape == (3, 2, 2) and r.correct.shape == (3, 2, 2, len(x))
    assert r.worst_of_grid_accuracy <= float(r.accuracy.min())
    assert torch.equal(r.worst_correct, r.correct.flatten(0, 2).all(0))
    assert r.worst_of_grid_accuracy < r.clean_accuracy  # the grid does break some examples here


def test_the_default_grid_is_engstroms_30_degrees_and_10_percent():
    g = SpatialGrid()
    assert g.shape == (31, 5, 5) and (min(g.rotations), max(g.rotations)) == (-30.0, 30.0)
    assert (min(g.translations_x), max(g.translations_x)) == (-0.1, 0.1) and 0.0 in g.translations_y
    assert SpatialGrid.uniform(10, 3, 0.2, 3) == SpatialGrid((-10.0, 0.0, 10.0), (-0.2, 0.0, 0.2), (-0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="rotations must be distinct"):
        SpatialGrid(rotations=(0.0, 0.0))
