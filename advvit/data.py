"""Data sets, splits and loaders: pixels in [0, 1], built on timm's transforms and loader.

Sources read from disk, in their own formats, with no download:

* ``fashion_mnist``, ``mnist``: the four idx files (``train-images-idx3-ubyte[.gz]`` ...),
  gzipped or not, from a folder: the Debian package ``dataset-fashion-mnist`` puts Fashion-MNIST
  in ``/usr/share/datasets/fashion-mnist``; torchvision's ``<root>/FashionMNIST/raw`` works too.
  torchvision's ``read_image_file`` / ``read_label_file`` parse them. Its ``MNIST`` class is not
  used: it reads only extracted files named exactly so in ``<root>/<class name>/raw``, and its
  parser opens plain files only, so a gzipped file is decompressed to a temporary file first.
* ``cifar10``, ``cifar100``: the python-pickle batches (``cifar-10-batches-py/``,
  ``cifar-100-python/``), extracted or still in their ``.tar.gz``; file names from torchvision's
  ``CIFAR10`` / ``CIFAR100`` tables. The batches are unpickled here with numpy arrays as the only
  allowed objects: torchvision's class would ``pickle.load`` them (running whatever code a crafted
  file holds), refuses files that differ from the release's md5 and cannot read the archive.
* ``imagefolder``: an ImageNet-style tree ``<root>/{train,val}/<class>/<image>``; a class-list file
  (one class folder name a line) selects a subset such as the thesis's ImageNet-100.
* timm's ``create_dataset`` names with a ``hfds/``, ``hfids/``, ``tfds/`` or ``wds/`` prefix,
  passed through for users who have those data sets.

Data sets yield ``(PIL image, int)`` pairs. ``create_loader`` turns them into batches of float
tensors in [0, 1] with timm's transform factory and loader (mean 0, std 1 per channel, so the
loader never normalizes: a model that wants normalized inputs carries ``NormalizedModel``).
"""
from __future__ import annotations

import copy
import functools
import gzip
import io
import logging
import os
import pickle
import shutil
import signal
import struct
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

import timm.data
import torchvision.datasets
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation, ToNumpy
from torchvision.datasets.mnist import read_image_file, read_label_file, read_sn3_pascalvincent_tensor

from .io import OptionError, input_file

__all__ = [
    "DataInfo",
    "DataNotFoundError",
    "DataError",
    "SplitError",
    "ArrayDataset",
    "SubsetDataset",
    "dataset_info",
    "create_dataset",
    "create_loader",
    "read_idx",
    "read_cifar",
    "known_places",
    "read_ids_file",
    "select_indices",
    "Examples",
    "load_examples",
    "read_examples",
    "DATASET_NAMES",
    "TIMM_PREFIXES",
]

_logger = logging.getLogger(__name__)

ImgSize = Union[int, Tuple[int, int]]

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder")
TIMM_PREFIXES = ("hfds/", "hfids/", "tfds/", "wds/")
_ALIASES = {
    "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "cifar-10": "cifar10", "cifar-100": "cifar100", "imagenet": "imagefolder",
    "imagenet100": "imagefolder", "imagenet-100": "imagefolder", "folder": "imagefolder",
}
_SPLITS = ("train", "val", "test")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


class DataNotFoundError(FileNotFoundError):
    """A data set is not where it was looked for; the message lists the places and how to get it."""


class DataError(ValueError):
    """A data set's file is there but cannot be used: truncated, corrupt, or holding objects
    other than data; the message names the file and what to do."""


class SplitError(ValueError):
    """A held-out split that leaves no example on one side (``val_fraction`` too small or large)."""


@dataclass(frozen=True)
class DataInfo:
    """A data set's facts.

    Attributes:
        num_classes: number of classes.
        in_chans: channels of its images (1 for grayscale).
        img_size: native (or conventional) square input size.
        mean: per-channel mean of its pixels in [0, 1] (for a model's ``normalize``).
        std: per-channel std of its pixels in [0, 1].
        classes: class names in label order, where known.
    """

    num_classes: int
    in_chans: int
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Optional[Tuple[str, ...]] = None


_STATIC_INFO = {
    "fashion_mnist": DataInfo(10, 1, 28, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES),
    "mnist": DataInfo(10, 1, 28, (0.1307,), (0.3081,), tuple(str(i) for i in range(10))),
    "cifar10": DataInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                         "ship", "truck")),
    "cifar100": DataInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Where each on-disk data set may sit below a search root, and what it takes to get it.
_SUBDIRS = {
    "fashion_mnist": ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "fashion-mnist/raw"),
    "mnist": ("", "mnist", "MNIST/raw", "mnist/raw"),
    "cifar10": (torchvision.datasets.CIFAR10.base_folder, "", "cifar10", "cifar-10"),
    "cifar100": (torchvision.datasets.CIFAR100.base_folder, "", "cifar100", "cifar-100"),
}
_HOW_TO_GET = {
    "fashion_mnist": (
        "install the Debian package (apt-get install dataset-fashion-mnist), which puts the idx files in "
        "/usr/share/datasets/fashion-mnist, or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (from the Fashion-MNIST release) in a "
        "folder and pass it as root"),
    "mnist": (
        "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz (the MNIST release files, gzipped or not) in a folder and pass it as root"),
    "cifar10": (
        "download cifar-10-python.tar.gz (the python version of CIFAR-10) and put it, or the "
        "cifar-10-batches-py folder it contains, in a folder passed as root"),
    "cifar100": (
        "download cifar-100-python.tar.gz (the python version of CIFAR-100) and put it, or the "
        "cifar-100-python folder it contains, in a folder passed as root"),
}


def known_places(name: str) -> List[Path]:
    """Search roots used when ``root=None``, in order.

    ``$ADVVIT_DATA`` (``os.pathsep``-separated), ``./data``, ``~/data``, ``~/.cache/advvit/data``,
    then the system places (``/usr/share/datasets`` and, for Fashion-MNIST, the Debian package's
    ``/usr/share/datasets/fashion-mnist``).
    """
    places = [Path(p) for p in os.environ.get("ADVVIT_DATA", "").split(os.pathsep) if p]
    places += [Path("data"), Path.home() / "data", Path.home() / ".cache" / "advvit" / "data"]
    if name == "fashion_mnist":
        places.append(Path("/usr/share/datasets/fashion-mnist"))
    places.append(Path("/usr/share/datasets"))
    return places


def _canonical(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"data set name must be a non-empty string, got {name!r}")
    if name.lower().startswith(TIMM_PREFIXES):
        return name
    key = name.lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown data set name {name!r}: use one of {DATASET_NAMES} or a timm name "
                         f"with a prefix in {TIMM_PREFIXES}")
    return key


# --------------------------------------------------------------------------------------------
# On-disk formats
# --------------------------------------------------------------------------------------------

# Type codes of the idx format and their item sizes (torchvision's SN3_PASCALVINCENT_TYPEMAP).
_IDX_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def _plain_copy_of_gzip(path: Path, tmp: Path) -> Path:
    """Decompress a gzipped file into ``tmp`` (torchvision's idx reader opens plain files only)."""
    out = tmp / path.name
    try:
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: gzip data is truncated or corrupt ({e}); fetch the file again") from None
    return out


def _check_idx_header(plain: Path, shown: Path) -> None:
    """Clear errors for what torchvision's idx parser only asserts (or fails to reshape).

    The header is 0, 0, a type code, the number of dimensions, then one big-endian uint32 per
    dimension; the data must fill the shape exactly.
    """
    with open(plain, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_ITEMSIZE or not 1 <= head[3] <= 3:
            raise DataError(f"{shown}: not an idx file (magic {head.hex()})")
        dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        raise DataError(f"{shown}: idx header is truncated")
    shape = struct.unpack(f">{head[3]}I", dims)
    expected = int(np.prod(shape)) * _IDX_ITEMSIZE[head[2]]
    held = plain.stat().st_size - 4 - len(dims)
    if held < expected:
        raise DataError(f"{shown}: idx data is truncated: header says {shape}, file holds "
                         f"{held // _IDX_ITEMSIZE[head[2]]} values")
    if held > expected:
        raise DataError(f"{shown}: idx file is longer than its header {shape} says ({held - expected} extra bytes)")


def _read_idx_with(reader: Callable[[str], torch.Tensor], path: Union[str, Path]) -> torch.Tensor:
    """Run one of torchvision's idx readers on ``path``, gzipped or not, with clear errors."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with tempfile.TemporaryDirectory(prefix="advvit-idx-") as tmp:
        plain = _plain_copy_of_gzip(path, Path(tmp)) if gzipped else path
        _check_idx_header(plain, path)
        try:
            return reader(str(plain))
        except (TypeError, ValueError) as e:  # torchvision's dtype / dimension checks
            raise DataError(f"{path}: {e}") from None


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped or not, with torchvision's reader.

    Args:
        path: the file.

    Returns:
        The array, shaped as the header says (``(N, H, W)`` images, ``(N,)`` labels).

    Raises:
        ValueError: a bad magic number, or a file shorter or longer than its header says.
    """
    return _read_idx_with(lambda p: read_sn3_pascalvincent_tensor(p, strict=False), path).numpy()


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    # The release files use "-idx3-ubyte"; some mirrors and older copies use ".idx3-ubyte".
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            p = folder / (name + suffix)
            if p.is_file():
                return p
    return None


_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _has_idx(folder: Path) -> bool:
    return all(_idx_file(folder, s) is not None for pair in _IDX_STEMS.values() for s in pair)


def _read_idx_split(name: str, folder: Path, split: str) -> ArrayDataset:
    """The images and labels of one split, read with torchvision's ``read_image_file`` /
    ``read_label_file`` (which check uint8 (N, H, W) images and uint8 (N,) labels)."""
    img_stem, lab_stem = _IDX_STEMS[split]
    images = _read_idx_with(read_image_file, _idx_file(folder, img_stem)).numpy()
    labels = _read_idx_with(read_label_file, _idx_file(folder, lab_stem)).numpy()
    if labels.shape != (images.shape[0],):
        raise DataError(f"{folder}: idx images {images.shape} and labels {labels.shape} do not pair up")
    return ArrayDataset(images, labels, _STATIC_INFO[name].classes)


class _RefusedGlobal(pickle.UnpicklingError):
    """A CIFAR batch names a class or function beyond numpy's arrays."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: plain containers and numpy arrays only.

    The python-version CIFAR files are pickles; allowing only numpy's array reconstruction keeps a
    crafted file from running code (torchvision's CIFAR10 calls ``pickle.load``, which would).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"global {module}.{name} is not allowed in a CIFAR batch file")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(f"{where}: holds objects other than arrays ({e}), which advvit will not "
                        "load: loading them could run code, and the CIFAR release's batches hold "
                        "none; fetch the data set again from its release") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{where}: not a readable CIFAR batch ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a CIFAR batch is a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass(frozen=True)
class _CifarLayout:
    """Where a CIFAR release keeps its batches: torchvision's CIFAR10 / CIFAR100 class tables."""

    train: Tuple[str, ...]
    test: Tuple[str, ...]
    meta: str
    names: str
    archive: str
    folder: str


def _cifar_layout(name: str) -> _CifarLayout:
    tv = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return _CifarLayout(train=tuple(f for f, _ in tv.train_list), test=tuple(f for f, _ in tv.test_list),
                        meta=tv.meta["filename"], names=tv.meta["key"], archive=tv.filename,
                        folder=tv.base_folder)


def _cifar_source(name: str, folder: Path) -> Optional[Callable[[str], Optional[bytes]]]:
    """A reader of the named batch files in ``folder``, its archive, or None if neither is there."""
    layout = _cifar_layout(name)
    if all((folder / f).is_file() for f in layout.train + layout.test):
        return lambda member: (folder / member).read_bytes() if (folder / member).is_file() else None
    archive = folder / layout.archive
    if archive.is_file():
        def read(member: str) -> Optional[bytes]:
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    f = tar.extractfile(f"{layout.folder}/{member}")
                    return f.read() if f is not None else None
            except KeyError:
                return None
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{archive}: truncated or corrupt archive ({e})") from None
        return read
    return None


def read_cifar(name: str, folder: Union[str, Path], split: str) -> Tuple[np.ndarray, np.ndarray, Optional[Tuple[str, ...]]]:
    """Read CIFAR-10 / CIFAR-100 batches in their python-pickle format.

    The file names are torchvision's (``CIFAR10`` / ``CIFAR100`` class tables); the batches are
    read here, as torchvision's reader unpickles without restriction, checks each file against
    the release's md5 and reads no ``.tar.gz``.

    Args:
        name: ``cifar10`` or ``cifar100``.
        folder: the folder holding the batch files (or the ``.tar.gz`` archive).
        split: ``train`` or ``test``.

    Returns:
        ``(images (N, 32, 32, 3) uint8, labels (N,) int64, class names or None)``.
    """
    folder = Path(folder)
    layout = _cifar_layout(name)
    source = _cifar_source(name, folder)
    if source is None:
        raise DataNotFoundError(f"{name}: no batch files or {layout.archive} in {folder}")
    images, labels = [], []
    for member in getattr(layout, split):
        raw = source(member)
        if raw is None:
            raise DataNotFoundError(f"{name}: {member} is missing from {folder}")
        batch = _unpickle(raw, f"{folder}/{member}")
        data = np.asarray(batch.get("data"))
        # torchvision's rule: CIFAR-10 batches hold "labels", CIFAR-100 ones "fine_labels".
        lab = batch.get("labels", batch.get("fine_labels"))
        if data.ndim != 2 or data.shape[1] != 3072 or lab is None or len(lab) != data.shape[0]:
            raise DataError(f"{folder}/{member}: expected 'data' (N, 3072) and N labels, got data "
                             f"{getattr(data, 'shape', None)}")
        images.append(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(lab, dtype=np.int64))
    names = None
    meta_raw = source(layout.meta)
    if meta_raw is not None:
        meta = _unpickle(meta_raw, f"{folder}/{layout.meta}")
        if layout.names in meta:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names])
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names


def _find_folder(name: str, root: Optional[Union[str, Path]]) -> Path:
    """The first candidate folder holding ``name``'s files; DataNotFoundError listing the places."""
    bases = [Path(root)] if root not in (None, "") else known_places(name)
    looked = []
    for base in bases:
        for sub in _SUBDIRS[name]:
            folder = (base / sub) if sub else base
            looked.append(str(folder))
            if not folder.is_dir():
                continue
            if name in ("fashion_mnist", "mnist") and _has_idx(folder):
                return folder
            if name in ("cifar10", "cifar100") and _cifar_source(name, folder) is not None:
                return folder
    listed = "\n  ".join(dict.fromkeys(looked))
    raise DataNotFoundError(f"data set {name!r} not found; looked in:\n  {listed}\nTo get it: {_HOW_TO_GET[name]}.")


# --------------------------------------------------------------------------------------------
# Data set classes
# --------------------------------------------------------------------------------------------

class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 arrays: yields ``(PIL image, int)``.

    Args:
        images: ``(N, H, W)`` (grayscale) or ``(N, H, W, C)`` uint8 array.
        targets: ``(N,)`` integer labels.
        classes: class names in label order, where known.
        transform: applied to the PIL image (``create_loader`` sets it on its own copy).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable] = None) -> None:
        images = np.asarray(images)
        targets = np.asarray(targets, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets
        self.classes = tuple(classes) if classes is not None else None
        self.transform = transform

    @property
    def in_chans(self) -> int:
        return 1 if self.images.ndim == 3 else self.images.shape[-1]

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def subset(self, indices: np.ndarray) -> "ArrayDataset":
        """A new data set of the given rows (arrays are copied, so the parent can be freed)."""
        return ArrayDataset(self.images[indices], self.targets[indices], self.classes, self.transform)


class SubsetDataset(torch.utils.data.Dataset):
    """Rows of a map-style data set, with its own ``transform`` (which ``torch.utils.data.Subset``
    lacks, so timm's loader could not set one on it).

    Args:
        base: a data set yielding ``(PIL image, int)`` with no transform of its own.
        indices: the rows.
        transform: applied to the PIL image.
    """

    def __init__(self, base: torch.utils.data.Dataset, indices: Sequence[int],
                 transform: Optional[Callable] = None) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, target = self.base[int(self.indices[index])]
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    @property
    def classes(self) -> Any:
        return getattr(self.base, "classes", None)


def _held_out(n: int, val_fraction: float, split_seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index split of ``n`` rows."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise SplitError(f"val_fraction={val_fraction} of {n} samples leaves {n_val} for validation and "
                         f"{n - n_val} for training: both need at least one")
    perm = np.random.default_rng(split_seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _read_class_list(class_list: Union[str, Path, Sequence[str]]) -> List[str]:
    if isinstance(class_list, (str, Path)):
        path = Path(class_list)
        if not path.is_file():
            raise DataNotFoundError(f"class_list file {path} does not exist: give a text file with one class "
                                    "folder name (e.g. an ImageNet wnid) a line")
        names = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    else:
        names = [str(c).strip() for c in class_list]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"class_list {class_list!r} names no classes")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_list repeats classes: {dup}")
    return names


def _imagefolder_split_dir(root: Path, split: str) -> Optional[Path]:
    """``root/<split>`` (with its usual synonyms), or None when root holds class folders directly."""
    names = {"train": ("train", "training"), "val": ("val", "validation", "valid"),
             "test": ("test", "val", "validation", "valid")}[split]
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _imagefolder_classes(folder: Path, class_list: Optional[Sequence[str]]) -> List[str]:
    present = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if class_list is None:
        if not present:
            raise DataNotFoundError(f"imagefolder: {folder} has no class folders (expected <class>/<image>)")
        return present
    missing = [c for c in class_list if c not in present]
    if missing:
        raise DataNotFoundError(f"imagefolder: {len(missing)} class(es) of class_list are not folders in {folder}: "
                                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return list(class_list)


def _create_imagefolder(root: Optional[Union[str, Path]], split: str, class_list: Any, single_ok: bool) -> Any:
    if root in (None, ""):
        raise DataNotFoundError("imagefolder needs root: the folder holding train/ and val/ (ImageNet layout "
                                "<root>/<split>/<class>/<image>), e.g. root=/data/imagenet")
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"imagefolder root {root} is not a folder: give the folder holding train/ and "
                                "val/ in the ImageNet layout (extract ILSVRC2012 there, val sorted into class folders)")
    folder = _imagefolder_split_dir(root, split)
    if folder is None:
        if split != "train" and not single_ok:
            raise DataNotFoundError(f"imagefolder: no {split}/ folder in {root}; add one or hold out part of train "
                                    "with val_fraction > 0")
        folder = root
    names = _read_class_list(class_list) if class_list is not None else None
    classes = _imagefolder_classes(folder, names)
    ds = timm.data.create_dataset("", root=str(folder), split=split, search_split=False,
                                  class_map={c: i for i, c in enumerate(classes)})
    ds.classes = tuple(classes)
    if len(ds) == 0:
        raise DataNotFoundError(f"imagefolder: no images found under {folder}")
    return ds


def dataset_info(name: str, root: Optional[Union[str, Path]] = None, *,
                 class_list: Optional[Union[str, Path, Sequence[str]]] = None) -> DataInfo:
    """The facts about a data set: classes, channels, native size, pixel mean and std.

    Known on-disk data sets need no files for this. ``imagefolder`` counts its class folders (or
    ``class_list``); timm names open the data set and read its class map.

    Raises:
        ValueError: an unknown name. DataNotFoundError: an image folder that is not there.
    """
    key = _canonical(name)
    if key in _STATIC_INFO:
        return _STATIC_INFO[key]
    mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    if key == "imagefolder":
        if class_list is not None:
            classes = _read_class_list(class_list)
        else:
            if root in (None, "") or not Path(root).is_dir():
                _create_imagefolder(root, "train", None, True)  # raises the clear error
            folder = _imagefolder_split_dir(Path(root), "train") or Path(root)
            classes = _imagefolder_classes(folder, None)
        return DataInfo(len(classes), 3, 224, tuple(mean), tuple(std), tuple(classes))
    ds = create_dataset(name, root)
    reader = getattr(ds, "reader", None)
    num = getattr(reader, "num_classes", None) or len(getattr(reader, "class_to_idx", None) or {}) or None
    if not num:
        raise ValueError(f"cannot tell the number of classes of {name!r}: set the model's num_classes in the config")
    return DataInfo(int(num), 3, 224, tuple(mean), tuple(std))


def create_dataset(name: str, root: Optional[Union[str, Path]] = None, *, split: str = "train",
                   val_fraction: float = 0.0, split_seed: int = 0,
                   class_list: Optional[Union[str, Path, Sequence[str]]] = None,
                   **timm_kwargs: Any) -> torch.utils.data.Dataset:
    """Open a data set split; it yields ``(PIL image, int)`` pairs.

    Args:
        name: ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``imagefolder``, or a timm
            name with a ``hfds/``, ``hfids/``, ``tfds/`` or ``wds/`` prefix.
        root: where the data set is; None searches ``known_places(name)``.
        split: ``train``, ``val`` or ``test``. With ``val_fraction == 0``, ``val`` and ``test`` are the
            data set's own evaluation split. With ``val_fraction > 0``, ``train`` and ``val`` are a
            seeded partition of the training split (the held-out set for model selection) and
            ``test`` stays the data set's own evaluation split.
        val_fraction: fraction of the training split held out as ``val``, in [0, 1).
        split_seed: seed of that partition (the same seed gives the same partition everywhere).
        class_list: ``imagefolder`` only: a text file (one class folder name a line) or a list of
            names, selecting and ordering the classes (ImageNet-100).
        **timm_kwargs: passed to ``timm.data.create_dataset`` for timm names (e.g. ``is_training``,
            ``batch_size``, ``seed`` for the iterable ones).

    Raises:
        DataNotFoundError: the data set is not there (the message says where it looked and how to
            get it). ValueError: a bad name, split or fraction, naming it.
    """
    key = _canonical(name)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if class_list is not None and key != "imagefolder":
        raise ValueError(f"class_list only applies to imagefolder data sets, not {name!r}")
    held_out = val_fraction > 0 and split in ("train", "val")
    source_split = "train" if held_out else ("train" if split == "train" else "test")

    if key in ("fashion_mnist", "mnist"):
        ds: Any = _read_idx_split(key, _find_folder(key, root), source_split)
    elif key in ("cifar10", "cifar100"):
        folder = _find_folder(key, root)
        images, labels, names = read_cifar(key, folder, source_split)
        ds = ArrayDataset(images, labels, names or _STATIC_INFO[key].classes)
    elif key == "imagefolder":
        ds = _create_imagefolder(root, "train" if held_out else split, class_list, single_ok=held_out)
    else:
        if held_out:
            raise ValueError(f"val_fraction > 0 is not supported for timm streaming data sets ({name!r}): "
                             "use the data set's own validation split (split='val')")
        timm_split = {"train": "train", "val": "validation", "test": "test"}[split]
        timm_split = timm_kwargs.pop("timm_split", timm_split)
        try:
            ds = timm.data.create_dataset(name, root=None if root is None else str(root), split=timm_split,
                                          **timm_kwargs)
        except (FileNotFoundError, ImportError, OSError) as e:
            raise DataNotFoundError(f"timm data set {name!r} (root={root}, split={timm_split!r}) could not be "
                                    f"opened: {e}. timm's {name.split('/')[0]}/ reader needs its package "
                                    "installed and the data present locally (no download happens here)") from e
        return ds

    if held_out:
        train_idx, val_idx = _held_out(len(ds), float(val_fraction), int(split_seed))
        idx = train_idx if split == "train" else val_idx
        ds = ds.subset(idx) if isinstance(ds, ArrayDataset) else SubsetDataset(ds, idx)
    return ds


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

class _ToMode:
    """Convert a PIL image to the channel mode the model takes ('L' for 1, 'RGB' for 3 channels).

    Placed before timm's transforms, so grayscale data feeds a 3-channel model (channels
    repeated) and colour data a 1-channel one (luminance), whatever transforms follow.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


class _Compose:
    """Apply callables in order (picklable, for worker processes)."""

    def __init__(self, *fns: Callable) -> None:
        self.fns = fns

    def __call__(self, x: Any) -> Any:
        for fn in self.fns:
            x = fn(x)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.fns))})"


class _DeviceLoader:
    """Moves each batch to a device (CPU loaders for a non-CUDA device, e.g. XLA)."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def batch_size(self) -> Optional[int]:
        return getattr(self.loader, "batch_size", None)


_AUGMENT_KEYS = {
    "no_aug", "scale", "ratio", "hflip", "vflip", "color_jitter", "color_jitter_prob", "grayscale_prob",
    "gaussian_blur_prob", "auto_augment", "re_prob", "re_mode", "re_count", "re_split", "interpolation",
    "crop_pct", "crop_mode", "crop_border_pixels", "train_crop_mode", "num_aug_repeats", "pin_memory",
    "use_multi_epochs_loader", "worker_seeding", "persistent_workers", "collate_fn", "img_dtype",
}


# Training augmentations timm's transform factory lacks (the thesis's CIFAR fine-tuning uses both).
_EXTRA_AUGMENT_KEYS = {"crop_padding", "rotation"}


def _with_crop_and_rotation(transform: Any, size: Tuple[int, int], padding: int,
                            degrees: float) -> Any:
    """timm's training transform with its random resized crop replaced by torchvision's
    ``RandomCrop(size, padding)`` (when ``padding``) and a ``RandomRotation(degrees)`` after it
    (when ``degrees``), both on the PIL image before timm's flips and colour jitter."""
    from torchvision import transforms as T
    steps = list(transform.transforms)
    index = next((i for i, t in enumerate(steps) if isinstance(t, RandomResizedCropAndInterpolation)),
                 None)
    if index is None:
        raise ValueError("crop_padding and rotation replace timm's random resized crop, which this "
                         f"training transform does not have: {transform}")
    crop = [T.RandomCrop(size, padding=padding)] if padding else [steps[index]]
    rotate = [T.RandomRotation(degrees)] if degrees else []
    return T.Compose(steps[:index] + crop + rotate + steps[index + 1:])


def _exit_on_parents_sigterm() -> None:
    parent = os.getppid()
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def _worker_init(init: Callable[[int], None], worker_id: int) -> None:
    """A loader worker that outlives a scheduler's SIGTERM (timm's own worker set-up follows).

    Schedulers (Slurm) send SIGTERM to every process of a job: a worker that died of it would
    fail the training step that waits for its batch ("DataLoader worker exited unexpectedly")
    before training could stop at a safe point. The worker leaves SIGTERM to a thread that
    exits only on its parent's: the one the loader's own shutdown sends (as torch's worker
    does). Where the system cannot say who sent a signal, torch's handling stays.
    """
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_parents_sigterm, daemon=True).start()
    init(worker_id)


def _native_size(dataset: Any) -> Optional[Tuple[int, int]]:
    size = getattr(dataset, "image_size", None)
    if size is None and isinstance(dataset, SubsetDataset):
        size = getattr(dataset.base, "image_size", None)
    return tuple(size) if size is not None else None


def create_loader(dataset: torch.utils.data.Dataset, *, img_size: ImgSize, in_chans: int, batch_size: int,
                  is_training: bool, num_workers: int = 0, distributed: bool = False,
                  device: Optional[Union[str, torch.device]] = None,
                  eval_transform: Optional[Callable[[Any], torch.Tensor]] = None,
                  **augment: Any) -> Any:
    """Batches of ``(x, y)``: x float32 ``(B, in_chans, H, W)`` in [0, 1], y int64 ``(B,)``.

    Training batches go through timm's ``create_transform`` (random resized crop, flips, colour
    jitter, auto-augment, random erasing, as ``augment`` says) and timm's ``create_loader``, with
    mean 0 and std 1 per channel so nothing is normalized. Evaluation at the data set's native size
    (no resize, no crop) uses a plain to-tensor transform, as timm's resize/crop would be an
    identity at many times the cost; other evaluation sizes use timm's eval transform (resize to
    ``img_size / crop_pct``, centre crop; ``crop_pct`` defaults to 1.0).

    On a CUDA device timm's prefetcher moves uint8 batches and scales them there (and applies
    random erasing on the device); on other devices batches are moved after collation.

    Worker processes outlive a SIGTERM that is not their parent's (a scheduler's, sent to every
    process of the job), so that training can stop on it at a safe point.

    The data set given is not changed: the loader works on a shallow copy with its own transform.

    Args:
        dataset: from ``create_dataset`` (or any data set with a ``transform`` attribute yielding
            ``(PIL image, int)``).
        img_size: model input size (int or (H, W)).
        in_chans: model input channels; grayscale data is repeated to 3 channels, colour data
            converted to luminance for 1.
        batch_size: samples per batch.
        is_training: random augmentation, shuffling and drop-last.
        num_workers: loader worker processes.
        distributed: shard with a distributed sampler (needs an initialised process group).
        device: where batches go (None: stay on the CPU).
        eval_transform: for evaluation, a model source's own preprocessing (PIL image to a
            [0, 1] tensor) in place of the above; it must give ``img_size`` images.
        **augment: timm ``create_loader`` names: scale, ratio, hflip, vflip, color_jitter,
            auto_augment, re_prob, re_mode, re_count, interpolation, crop_pct, crop_mode, no_aug, ...;
            and two timm lacks, for training: ``crop_padding`` (pad, then a random ``img_size``
            crop in place of the random resized crop: the CIFAR crop) and ``rotation`` (random
            rotation up to that many degrees). ``no_aug`` turns them off too.

    Raises:
        ValueError: an unknown augmentation name or a bad size/channel count.
    """
    unknown = set(augment) - _AUGMENT_KEYS - _EXTRA_AUGMENT_KEYS
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {sorted(unknown)}: use timm create_loader names "
                         f"{sorted(_AUGMENT_KEYS)}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 for image data, got {in_chans}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")
    if not hasattr(dataset, "transform"):
        raise ValueError(f"{type(dataset).__name__} has no transform attribute: build it with create_dataset")

    dev = torch.device(device) if device is not None else None
    use_prefetcher = dev is not None and dev.type == "cuda"
    augment.setdefault("crop_pct", 1.0)  # small images: evaluate on the whole image unless told
    crop_padding, rotation = int(augment.pop("crop_padding", 0)), float(augment.pop("rotation", 0.0))
    if crop_padding < 0 or not 0.0 <= rotation <= 180.0:
        raise ValueError(f"crop_padding must be >= 0 and rotation in [0, 180] degrees, got "
                         f"{crop_padding} and {rotation}")
    persistent = augment.pop("persistent_workers", num_workers > 0)
    view = copy.copy(dataset)  # timm's create_loader sets view.transform; the caller's data set keeps its own
    kwargs: Dict[str, Any] = dict(
        input_size=(in_chans, *size), batch_size=batch_size, is_training=is_training,
        mean=(0.0,) * in_chans, std=(1.0,) * in_chans, num_workers=num_workers, distributed=distributed,
        use_prefetcher=use_prefetcher, persistent_workers=persistent,
        pin_memory=augment.pop("pin_memory", use_prefetcher),
    )
    if use_prefetcher:
        kwargs["device"] = dev
    loader = timm.data.create_loader(view, **kwargs, **augment)
    if num_workers > 0:
        batches = getattr(loader, "loader", loader)  # timm's PrefetchLoader wraps the DataLoader
        batches.worker_init_fn = functools.partial(_worker_init, batches.worker_init_fn)

    native = _native_size(dataset)
    plain_eval = (not is_training and native == size and augment.get("crop_pct") in (None, 1.0)
                  and not augment.get("crop_border_pixels"))
    if eval_transform is not None and not is_training:
        if use_prefetcher:
            raise ValueError("eval_transform gives float tensors; timm's CUDA prefetcher takes "
                             "uint8 arrays: load the examples on the CPU")
        transform = eval_transform
    elif plain_eval:
        # Nothing to resize or crop: a to-tensor (to-uint8-array for the prefetcher) is enough.
        transform = ToNumpy() if use_prefetcher else MaybeToTensor()
    else:
        transform = view.transform
        if is_training and not augment.get("no_aug") and (crop_padding or rotation):
            transform = _with_crop_and_rotation(transform, size, crop_padding, rotation)
    view.transform = _Compose(_ToMode("L" if in_chans == 1 else "RGB"), transform)
    if dev is not None and not use_prefetcher and dev.type != "cpu":
        return _DeviceLoader(loader, dev)
    return loader


# --------------------------------------------------------------------------------------------
# examples for evaluation and analysis: which ones, and as tensors
# --------------------------------------------------------------------------------------------

def read_ids_file(path: Union[str, Path]) -> List[str]:
    """Read a file of example ids: one integer index or one relative image path per line.

    Blank lines and lines starting with '#' are skipped (RobustBench's ImageNet subset files are
    plain relative paths, e.g. ``n01440764/ILSVRC2012_val_00000293.JPEG``).

    Raises:
        OptionError: naming ``--ids-file``: the file is missing, a folder, or lists no ids.
    """
    p = input_file(path, "--ids-file", example="imagenet_test_image_ids.txt")
    ids = [line.strip() for line in p.read_text().splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    if not ids:
        raise OptionError(f"--ids-file {p} lists no ids")
    return ids


def _dataset_paths(dataset: Any) -> Optional[List[str]]:
    """Relative image paths of an image-folder data set in index order, or None if it has none."""
    filenames = getattr(dataset, "filenames", None)
    if filenames is None:
        return None
    try:
        return [str(Path(f).as_posix()) for f in filenames(basename=False, absolute=False)]
    except TypeError:
        return None


def select_indices(n_total: int, *, n_examples: Optional[int] = None, sample: str = "first",
                   seed: int = 0, ids: Optional[Sequence[str]] = None,
                   paths: Optional[Sequence[str]] = None) -> List[int]:
    """Which examples to evaluate: the first N, a seeded random N, or those of an ids file.

    Args:
        n_total: size of the data split.
        n_examples: how many (None: all, or all ids); with ids, the first N ids.
        sample: "first" or "random" (a seeded choice, sorted, so order does not depend on it).
        seed: the seed of the random choice.
        ids: integer indices or relative image paths (from :func:`read_ids_file`).
        paths: the data set's relative image paths, for path ids.

    Raises:
        OptionError: an id that is out of range or not found, or more examples than there are.
    """
    if n_examples is not None and n_examples < 1:
        raise OptionError(f"--n-examples must be >= 1, got {n_examples}")
    if ids is not None:
        if all(i.lstrip("-").isdigit() for i in ids):
            chosen = [int(i) for i in ids]
            bad = [i for i in chosen if not 0 <= i < n_total]
            if bad:
                raise OptionError(f"--ids-file has indices outside the split's 0..{n_total - 1}: "
                                  f"{bad[:5]}")
        else:
            if paths is None:
                raise OptionError("--ids-file lists image paths, but this data set has no image "
                                  "files: give integer indices, or use --dataset imagefolder")
            where = {p: k for k, p in enumerate(paths)}
            chosen = []
            for i in ids:
                # The file's paths may carry a leading split folder ("val/n0144.../x.JPEG").
                parts = Path(i).as_posix().split("/")
                hit = next((where[s] for s in ("/".join(parts[j:]) for j in range(len(parts)))
                            if s in where), None)
                if hit is None:
                    raise OptionError(f"--ids-file path {i!r} is not in the data split (paths "
                                      f"look like {paths[0]!r}): check --data-dir and --split")
                chosen.append(hit)
        if n_examples is not None:
            chosen = chosen[:n_examples]
        return chosen
    n = n_total if n_examples is None else n_examples
    if n > n_total:
        raise OptionError(f"--n-examples {n} is more than the {n_total} examples of the split")
    if sample == "first":
        return list(range(n))
    if sample == "random":
        g = np.random.default_rng(seed)
        return sorted(int(i) for i in g.choice(n_total, size=n, replace=False))
    raise OptionError(f"--sample must be 'first' or 'random', got {sample!r}")


@dataclass(frozen=True)
class Examples:
    """Examples of a data split as [0, 1] tensors.

    Attributes:
        x: (n, C, H, W) float pixels; y: (n,) labels.
        indices: each example's index in the split.
        classes: the data set's class names in label order, or None where it has none.
    """

    x: torch.Tensor
    y: torch.Tensor
    indices: List[int]
    classes: Optional[Tuple[str, ...]]


def load_examples(dataset: str, data_dir: Optional[Union[str, Path]], *, split: str,
                  in_chans: int, img_size: Optional[int], n_examples: Optional[int] = None,
                  sample: str = "first", seed: int = 0, ids: Optional[Sequence[str]] = None,
                  batch_size: int = 250, workers: int = 0, at_most: bool = False,
                  eval_transform: Optional[Callable[[Any], torch.Tensor]] = None) -> Examples:
    """Load the chosen examples of a data split as a model takes them (evaluation, analyses).

    Args:
        dataset, data_dir, split: the data set's name, root and split.
        in_chans, img_size: what the model takes (img_size None: the data set's own size, else
            224).
        n_examples, sample, seed, ids: which examples (:func:`select_indices`).
        batch_size, workers: the loader's.
        at_most: take all examples of a split smaller than ``n_examples`` (for a default
            count the user did not ask for) instead of refusing.
        eval_transform: the model source's own preprocessing
            (:attr:`advvit.checkpoint.LoadedModel.eval_transform`), None: advvit's.

    Raises:
        OptionError: the data set is not there, or the examples asked for are not in it.
    """
    try:
        ds = create_dataset(dataset, data_dir, split=split)
    except (DataNotFoundError, ValueError) as err:
        raise OptionError(f"--dataset {dataset}: {err}") from None
    if at_most and n_examples is not None:
        n_examples = min(n_examples, len(ds))
    indices = select_indices(len(ds), n_examples=n_examples, sample=sample, seed=seed, ids=ids,
                             paths=_dataset_paths(ds) if ids is not None else None)
    subset = ds.subset(np.asarray(indices)) if isinstance(ds, ArrayDataset) else \
        SubsetDataset(ds, indices)
    native = _native_size(ds)
    loader = create_loader(subset, img_size=img_size or (native[0] if native else 224),
                           in_chans=in_chans, batch_size=batch_size, is_training=False,
                           num_workers=workers, eval_transform=eval_transform)
    xs, ys = zip(*[(xb.cpu(), yb.cpu()) for xb, yb in loader])
    x, y = torch.cat(xs), torch.cat(ys).long()
    if len(y) != len(indices):
        raise OptionError(f"the loader gave {len(y)} examples for {len(indices)} ids")
    classes = getattr(ds, "classes", None)
    return Examples(x, y, indices, tuple(str(c) for c in classes) if classes else None)


def read_examples(dataset: Any, indices: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of a data set from :func:`create_dataset` as stored (no resizing or
    scaling: what :mod:`advvit.analysis.shifts` corrupts), as tensors.

    Args:
        dataset: yields ``(PIL image, int)``; an in-memory one (``ArrayDataset``) is read directly.
        indices: which examples (default: all).

    Returns:
        ``(uint8 (N, C, H, W), int64 (N,))``, C 1 for grey data and 3 for colour.
    """
    if indices is None:
        indices = range(len(dataset))
    idx = np.asarray(list(indices), dtype=np.int64)
    if hasattr(dataset, "images") and hasattr(dataset, "targets"):
        images, labels = np.asarray(dataset.images)[idx], np.asarray(dataset.targets)[idx]
    else:
        pairs = [dataset[int(i)] for i in idx]
        arrays = [np.asarray(img) for img, _ in pairs]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"the examples have different sizes ({sorted({a.shape for a in arrays})}): "
                             "resize them to one size first")
        images, labels = np.stack(arrays), np.asarray([label for _, label in pairs])
    if images.ndim == 3:
        images = images[..., None]
    nchw = np.ascontiguousarray(images.astype(np.uint8, copy=False).transpose(0, 3, 1, 2))
    return torch.from_numpy(nchw), torch.as_tensor(labels, dtype=torch.long)
