"""Robustness beyond Lp balls: ImageNet-C common corruptions and spatial (rotation / translation) grids.

Corruptions
    The 15 ImageNet-C corruptions of Hendrycks & Dietterich (2019) at severities 1-5, computed by
    the reference corruption code in its maintained release (``imagecorruptions-imaug``, called
    only through :mod:`advvit.analysis._corruption_compat`, which says what it fixes there).
    :func:`corrupt` corrupts a batch; :func:`generate_corruptions` many (corruption, severity)
    sets in worker processes; :class:`CorruptionCache` keeps them on disk as uint8 with a
    checksummed manifest; :func:`evaluate_corruptions` gives the accuracy per (corruption,
    severity) and :func:`mean_corruption_error` the mCE against a baseline.

    Determinism: each image's corruption draws all its randomness from a seed made of ``seed``,
    the corruption, the severity and the image's own bytes, so an image is corrupted the same way
    in any batch, subset, order, chunking or worker count. The caller's ``np.random`` state is
    restored after every image; ``torch``'s generators are never used.

    Grey images (1 channel) go through the library as its ``corrupt()`` takes them: repeated to
    three channels. The first channel comes back. Thirteen corruptions treat the channels alike,
    so it equals every channel; the three noises draw each channel's noise independently, and
    the first channel keeps each pixel's noise at the level the severity names (a luminance would
    average three draws and cut the noise by a third); frost adds its photograph's red channel.

    Small images. The library's constants are in pixels, tuned for 224x224 ImageNet images, and
    are used unchanged at the native size, so at 28x28 / 32x32 a corruption is stronger relative
    to the image than on ImageNet (7-8x for the pixel-sized ones). Re-tuning them would be a fork
    (Hendrycks's own CIFAR-10-C used other constants, so the numbers here are not comparable to
    published CIFAR-10-C results); resizing to 224 and back would add blur to every image and cost
    64x the pixels. At 28x28 (32x32 about the same):

    =====================  ===================================================================
    noises (3)             per pixel: same meaning at any size
    defocus blur           disk radius 3-10 px: 11-36% of the side (1.3-4.5% at 224)
    glass blur             blur sigma 0.7-1.5 px, pixels swapped up to 1-4 px away (4-14%)
    motion blur            line kernel of radius 10-20 px (36-71% of the side), sigma 3-15 px
    zoom blur              zoom factors up to 1.10-1.30: relative, same meaning
    snow                   flake layer zoomed by a relative factor, then motion-blurred 10-12 px
    frost                  a 28x28 crop of a 300-600 px frost photograph at its own scale: an
                           eighth of the side a 224 crop spans, so its large ice structures are
                           lost, with 3/4 of its pixel contrast (std 19 vs 26 grey levels); the
                           crops' mean brightness varies between images (std 49 levels)
    fog                    plasma fractal on the next power of two (32 px): relative
    brightness, contrast   global: same meaning
    elastic                smoothing sigma 1% of the side (0.28 px: almost none) with the
                           absolute gain: per-pixel jitter of up to 1.75-4.2 px, close to glass blur
    pixelate               factor 0.6-0.25 of the side (down to 7x7 px): relative
    jpeg                   quality 25-7 on 8x8 blocks: 3.5 blocks a side
    =====================  ===================================================================

Spatial
    :func:`evaluate_spatial` is Engstrom et al. (2019)'s grid attack: every image is rotated and
    translated to every point of a :class:`SpatialGrid` (default: rotations -30..30 degrees in 2
    degree steps, translations -10..10% of the side in 5% steps along each axis, 31 x 5 x 5 =
    775 points); an image counts as robust only when it is classified correctly at every point.
    The transform (:func:`spatial_transform`) rotates about the centre, then translates, sampling
    bilinearly from the image zero (black) padded, as Engstrom et al.'s code does: a pixel's value
    is the bilinear interpolation of its four source neighbours, those outside the image being 0.
    (torchvision's ``affine`` with ``fill=0`` multiplies that once more by the interpolated
    coverage, darkening the moved image's one-pixel edge twice.)
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from advvit.analysis import _corruption_compat as compat
from advvit.analysis._common import LUMA, device_of
from advvit.attacks import model_mode
from advvit.io import OptionError, atomic_write, atomic_write_json, check_folder

__all__ = [
    "CORRUPTIONS", "SEVERITIES", "CACHE_FORMAT", "Task",
    "corrupt", "generate_corruptions", "CorruptionCache",
    "CorruptionAccuracy", "evaluate_corruptions", "MeanCorruptionError", "mean_corruption_error",
    "SpatialGrid", "spatial_transform", "SpatialAccuracy", "evaluate_spatial",
    "CORRUPTION_CACHE", "CorruptionSettings", "corruption_settings", "run_corruptions",
    "CorruptionStudy", "corruption_study",
]

_logger = logging.getLogger(__name__)

CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
"""ImageNet-C's 15 corruptions (noise, blur, weather, digital), in the paper's order."""
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)
CACHE_FORMAT = "advvit-corruption-cache/1"
Task = Tuple[str, int]
"""``(corruption, severity)``."""

_MAX_CHUNK = 256


# --------------------------------------------------------------------------------------------
# Argument checks and conversions
# --------------------------------------------------------------------------------------------

def _check_task(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: use one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_images(images: Tensor) -> None:
    """``(N, C, H, W)``, C 1 or 3, uint8 or finite floats in [0, 1]."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3) or images.numel() == 0:
        raise ValueError("images must be a non-empty (N, C, H, W) tensor with C = 1 (grey) or 3 (RGB), got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise ValueError("floating-point images must be finite and in [0, 1] (got "
                         f"[{float(images.min()):.4g}, {float(images.max()):.4g}]): pass pixels, not normalized inputs")


def _uint8_images(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` uint8 on the CPU from uint8 or [0, 1] floating-point images."""
    _check_images(images)
    x = images.detach().cpu()
    if x.dtype == torch.uint8:
        return x
    # The library works on 8-bit images: [0, 1] pixels are rounded to the nearest 1/255.
    return (x.double() * 255.0).round().to(torch.uint8)


def _labels(labels: Tensor, n: int) -> Tensor:
    if not torch.is_tensor(labels) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    return labels.detach().cpu().long()


def _tasks(corruptions: Sequence[str], severities: Sequence[int]) -> List[Task]:
    if not corruptions or not severities:
        raise ValueError("corruptions and severities must not be empty")
    if len(set(corruptions)) != len(corruptions) or len(set(severities)) != len(severities):
        raise ValueError(f"corruptions and severities must not repeat: {list(corruptions)}, {list(severities)}")
    return _checked_tasks([(name, s) for name in corruptions for s in severities])


def _nhwc(images: Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


def _nchw(images: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _workers(workers: Optional[int]) -> int:
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be None (the cores available), 0 (this process) or >= 1, got {workers!r}")
    return workers


# --------------------------------------------------------------------------------------------
# Corrupting
# --------------------------------------------------------------------------------------------

def _image_seed(seed: int, name: str, severity: int, image: np.ndarray) -> int:
    """The seed of one image's corruption: from the run's seed, the task and the image's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{name}/{severity}/{image.shape}".encode())
    digest.update(image.tobytes())
    words = np.frombuffer(digest.digest(), dtype=np.uint32)
    return int(np.random.SeedSequence([int(seed), *words.tolist()]).generate_state(1)[0])


def _corrupt_nhwc(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt ``(N, H, W, C)`` uint8 images one by one (the worker processes' job)."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
        corrupted = compat.apply(rgb, name, severity, _image_seed(seed, name, severity, image))
        out[i] = corrupted if image.shape[-1] == 3 else corrupted[..., :1]
    return out


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """One ImageNet-C corruption of a batch, in this process.

    Args:
        images: ``(N, C, H, W)`` or ``(C, H, W)``, C 1 or 3, uint8 or floating point in [0, 1]
            (rounded to the nearest 1/255 first: the library corrupts 8-bit images).
        name: one of :data:`CORRUPTIONS`.
        severity: 1 to 5.
        seed: >= 0; with the image's own bytes it fixes all the randomness (see the module).

    Returns:
        The corrupted images, same shape and dtype (floats are the uint8 result / 255).

    Raises:
        ValueError: a bad name, severity, seed, shape, dtype or range.
        CorruptionLibraryMissing: the library is not installed.
    """
    _check_task(name, severity)
    _check_seed(seed)
    single = torch.is_tensor(images) and images.dim() == 3
    batch = images.unsqueeze(0) if single else images
    u8 = _uint8_images(batch)
    compat.library()
    out = _nchw(_corrupt_nhwc(_nhwc(u8), name, int(severity), int(seed)))
    if images.is_floating_point():
        out = (out.double() / 255.0).to(images.dtype)
    return out[0] if single else out


def _init_worker() -> None:
    # One thread per worker: the workers already fill the cores.
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass
    compat.library()


def _pooled(images: np.ndarray, tasks: Sequence[Task], seed: int, workers: int) -> Iterator[Tuple[Task, np.ndarray]]:
    """Each task's corrupted images, in task order, computed by ``workers`` processes in chunks.

    A bounded number of chunks is in flight, so memory does not grow with the number of tasks
    when the consumer is slower than the workers.
    """
    n = len(images)
    size = max(1, min(_MAX_CHUNK, math.ceil(n / workers)))
    jobs = iter([(task, slice(a, min(n, a + size))) for task in tasks for a in range(0, n, size)])
    window = 4 * workers
    # spawn, not fork: the parent may hold torch / OpenCV thread pools, which fork can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        pending: Deque[Tuple[Task, slice, Future]] = collections.deque()

        def fill() -> None:
            while len(pending) < window:
                job = next(jobs, None)
                if job is None:
                    return
                (name, sev), part = job
                pending.append(((name, sev), part, pool.submit(_corrupt_nhwc, images[part], name, sev, seed)))

        fill()
        parts: List[np.ndarray] = []
        while pending:
            task, part, future = pending.popleft()
            parts.append(future.result())
            fill()
            if part.stop == n:
                yield task, np.concatenate(parts)
                parts = []


def generate_corruptions(images: Tensor, tasks: Iterable[Task], *, seed: int = 0,
                         workers: Optional[int] = None) -> Iterator[Tuple[Task, Tensor]]:
    """Corrupted copies of ``images`` for many (corruption, severity) tasks, in task order.

    Args:
        images: ``(N, C, H, W)`` uint8 or [0, 1] floats, C 1 or 3.
        tasks: ``(corruption, severity)`` pairs.
        seed: >= 0 (see :func:`corrupt`: the result equals ``corrupt(images, *task, seed)``).
        workers: worker processes; None: the cores available to this process; 0: this process.
            Each worker takes a few seconds to start (it imports torch), worth it from a few
            thousand image-corruptions on. Workers are spawned, so they import the main module:
            a script calling this needs the ``if __name__ == "__main__":`` guard.

    Returns:
        An iterator of ``((corruption, severity), uint8 (N, C, H, W))``; the arguments are
        checked before it is returned.
    """
    tasks = _checked_tasks(tasks)
    _check_seed(seed)
    count = _workers(workers)
    u8 = _nhwc(_uint8_images(images))
    compat.library()
    return _generate(u8, tasks, int(seed), count)


def _checked_tasks(tasks: Iterable[Task]) -> List[Task]:
    out = [(name, int(s)) if isinstance(s, (int, np.integer)) and not isinstance(s, bool) else (name, s)
           for name, s in tasks]
    for name, s in out:
        _check_task(name, s)
    return out


def _generate(images: np.ndarray, tasks: List[Task], seed: int, workers: int) -> Iterator[Tuple[Task, Tensor]]:
    if workers == 0:
        for name, s in tasks:
            yield (name, s), _nchw(_corrupt_nhwc(images, name, s, seed))
        return
    for task, out in _pooled(images, tasks, seed, workers):
        yield task, _nchw(out)


# --------------------------------------------------------------------------------------------
# The disk cache
# --------------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(u8: Tensor) -> str:
    digest = hashlib.sha256(str(tuple(u8.shape)).encode())
    digest.update(u8.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class CorruptionCache:
    """Corrupted examples on disk, generated once per (data set, examples, corruption, severity, seed).

    One folder per (data set, examples, library version) under ``root`` holds one uint8
    ``(N, C, H, W)`` ``.npy`` file per (corruption, severity, seed) and a ``manifest.json``
    recording, for each file, its size and sha256 and what it holds. Every file is written whole
    through :mod:`advvit.io`. A file is used only when the manifest lists it and its size,
    checksum, dtype and shape match; anything else (missing, truncated, altered, an unreadable
    manifest) is logged and generated again, never trusted. Two processes sharing a cache at once
    stay correct: each rereads the manifest before adding to it, and an entry lost to a race is
    only generated again.

    Args:
        root: the cache folder (created when missing).
        workers: worker processes generating what is missing (see :func:`generate_corruptions`).
    """

    def __init__(self, root: Union[str, "os.PathLike[str]"], *, workers: Optional[int] = None) -> None:
        self.root = Path(root)
        self.workers = _workers(workers)

    def folder(self, dataset: str, fingerprint: str) -> Path:
        """Where the corrupted sets of these examples live."""
        key = _sha256(f"{CACHE_FORMAT}|{dataset}|{fingerprint}|{compat.library_version()}".encode())[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_.") or "examples"
        return self.root / f"{slug}-{key}"

    def corrupted(self, images: Tensor, tasks: Iterable[Task], *, dataset: str = "",
                  seed: int = 0) -> Iterator[Tuple[Task, Tensor]]:
        """Each task's corrupted images: cached ones first, then the missing ones as generated.

        Args:
            images: ``(N, C, H, W)`` uint8 or [0, 1] floats, C 1 or 3.
            tasks: ``(corruption, severity)`` pairs.
            dataset: the data set's name and split (``"fashion_mnist/test"``): part of the key.
            seed: >= 0.

        Returns:
            An iterator of ``((corruption, severity), uint8 (N, C, H, W))``, each equal to
            :func:`corrupt`'s result; the arguments are checked before it is returned.
        """
        tasks = _checked_tasks(tasks)
        _check_seed(seed)
        u8 = _uint8_images(images)
        return self._corrupted(u8, tasks, dataset, int(seed))

    def _corrupted(self, u8: Tensor, tasks: List[Task], dataset: str, seed: int) -> Iterator[Tuple[Task, Tensor]]:
        fingerprint = _fingerprint(u8)
        folder = self.folder(dataset, fingerprint)
        header = {"format": CACHE_FORMAT, "dataset": dataset, "library": compat.library_version(),
                  "examples": {"shape": list(u8.shape), "sha256": fingerprint}}
        entries = self._manifest(folder, header)["entries"]
        missing: List[Task] = []
        for task in tasks:
            hit = self._load(folder, header, entries, task, seed)
            if hit is None:
                missing.append(task)
            else:
                yield task, hit
        for task, out in generate_corruptions(u8, missing, seed=seed, workers=self.workers):
            self._store(folder, header, task, seed, out)
            yield task, out

    @staticmethod
    def _entry_key(task: Task, seed: int) -> str:
        return f"{task[0]}/{task[1]}/{seed}"

    @staticmethod
    def _file_name(task: Task, seed: int) -> str:
        return f"{task[0]}-{task[1]}-seed{seed}.npy"

    @staticmethod
    def _manifest(folder: Path, header: Mapping[str, Any]) -> Dict[str, Any]:
        path = folder / "manifest.json"
        if not path.exists():
            return {**header, "entries": {}}
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            if {k: manifest.get(k) for k in header} != dict(header) or not isinstance(manifest.get("entries"), dict):
                raise ValueError("it describes other examples")
        except (OSError, ValueError) as err:
            _logger.warning("corruption cache %s: manifest unusable (%s); its entries are generated again", path, err)
            return {**header, "entries": {}}
        return manifest

    def _load(self, folder: Path, header: Mapping[str, Any], entries: Mapping[str, Any], task: Task,
              seed: int) -> Optional[Tensor]:
        entry = entries.get(self._entry_key(task, seed))
        if entry is None:
            return None
        path = folder / self._file_name(task, seed)  # never a path read from the manifest
        try:
            if entry["file"] != path.name:
                raise ValueError(f"the manifest names another file ({entry['file']!r})")
            data = path.read_bytes()
            if len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
                raise ValueError(f"{len(data)} bytes with another checksum than the manifest's "
                                 f"({entry['bytes']} bytes): truncated or altered")
            array = np.load(io.BytesIO(data), allow_pickle=False)
            shape = tuple(header["examples"]["shape"])
            if array.dtype != np.uint8 or array.shape != shape:
                raise ValueError(f"holds {array.dtype} {array.shape}, not uint8 {shape}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            _logger.warning("corruption cache %s: %s; generating it again", path, err)
            return None
        return torch.from_numpy(array)

    def _store(self, folder: Path, header: Mapping[str, Any], task: Task, seed: int, images: Tensor) -> None:
        name = self._file_name(task, seed)
        data = _npy_bytes(images.numpy())
        atomic_write(folder / name, lambda f: f.write(data))
        manifest = self._manifest(folder, header)  # reread: another process may have added entries
        manifest["entries"][self._entry_key(task, seed)] = {
            "file": name, "bytes": len(data), "sha256": _sha256(data),
            "corruption": task[0], "severity": task[1], "seed": seed}
        atomic_write_json(folder / "manifest.json", manifest, indent=1)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def _to_channels(x: Tensor, in_chans: Optional[int]) -> Tensor:
    """Grey repeated to 3 channels, colour to luminance for 1, as :mod:`advvit.data` feeds models."""
    if in_chans is None or in_chans == x.shape[1]:
        return x
    if in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _check_in_chans(in_chans: Optional[int]) -> None:
    if in_chans not in (None, 1, 3):
        raise ValueError(f"in_chans must be None (as the images come), 1 or 3, got {in_chans!r}")


def _predict(model: nn.Module, x: Tensor, in_chans: Optional[int]) -> Tensor:
    return model(_to_channels(x, in_chans)).argmax(dim=1)


@torch.inference_mode()
def _correct(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int,
             in_chans: Optional[int]) -> Tensor:
    """Per-example correctness of the model on uint8 or [0, 1] images, batch by batch."""
    device = device_of(model)
    out = torch.empty(len(images), dtype=torch.bool)
    with model_mode(model, "eval"):
        for start in range(0, len(images), batch_size):
            xb = images[start:start + batch_size].to(device)
            xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
            out[start:start + batch_size] = _predict(model, xb, in_chans).cpu() == labels[start:start + batch_size]
    return out


def _accuracy(correct: Tensor) -> float:
    return float(correct.double().mean())


@dataclass(frozen=True)
class CorruptionAccuracy:
    """A model's accuracy on the corrupted examples.

    Attributes:
        corruptions, severities: what was evaluated, in order.
        accuracy: corruption -> accuracy at each severity (in ``severities``' order).
        clean_accuracy: on the uncorrupted (8-bit) examples.
        n: examples.
        seed: the corruptions' seed.
        examples_sha256: the examples' fingerprint (uint8 bytes and shape).
        library: the corruption library and its version.
        tasks_correct: per example, how many of the (corruption, severity) pairs it is
            classified right under (so two models on the same examples compare image by image).
        clean_correct: per example, whether it is classified right uncorrupted.
    """

    corruptions: Tuple[str, ...]
    severities: Tuple[int, ...]
    accuracy: Dict[str, Tuple[float, ...]]
    clean_accuracy: float
    n: int
    seed: int
    examples_sha256: str
    library: str
    tasks_correct: Tuple[int, ...] = ()
    clean_correct: Tuple[bool, ...] = ()

    @property
    def mean_corruption_accuracy(self) -> float:
        """The mean over every (corruption, severity)."""
        return float(np.mean([a for accs in self.accuracy.values() for a in accs]))

    def error(self, corruption: str) -> Tuple[float, ...]:
        """1 - accuracy at each severity."""
        return tuple(1.0 - a for a in self.accuracy[corruption])

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready."""
        return {"corruptions": list(self.corruptions), "severities": list(self.severities),
                "accuracy": {c: list(a) for c, a in self.accuracy.items()},
                "clean_accuracy": self.clean_accuracy,
                "mean_corruption_accuracy": self.mean_corruption_accuracy,
                "n": self.n, "seed": self.seed, "examples_sha256": self.examples_sha256,
                "library": self.library,
                "per_example": {"tasks": len(self.corruptions) * len(self.severities),
                                "tasks_correct": list(self.tasks_correct),
                                "clean_correct": [int(c) for c in self.clean_correct]}}


def evaluate_corruptions(model: nn.Module, images: Tensor, labels: Tensor, *,
                         corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                         seed: int = 0, cache: Union[CorruptionCache, str, "os.PathLike[str]", None] = None,
                         dataset: str = "", workers: Optional[int] = None, batch_size: int = 256,
                         in_chans: Optional[int] = None) -> CorruptionAccuracy:
    """Accuracy per (corruption, severity) of a model taking [0, 1] pixels.

    Args:
        model: maps ``(B, in_chans, H, W)`` [0, 1] pixels to logits, on its device; it runs in
            eval mode (every submodule's mode is restored afterwards).
        images: ``(N, C, H, W)`` uint8 or [0, 1] floats in the data set's own channels (1 or 3).
        labels: ``(N,)`` integer labels.
        corruptions, severities: what to evaluate (default: all 15 x 5).
        seed: the corruptions' seed.
        cache: a :class:`CorruptionCache` or its folder; None generates in memory every time.
        dataset: the data set's name and split, for the cache key.
        workers: generation processes (None: the cores available; 0: this process); a given
            ``CorruptionCache`` uses its own.
        batch_size: examples per forward pass.
        in_chans: the model's input channels when they differ from the images' (grey is repeated
            to 3, colour turned to luminance for 1, after corrupting); None: as the images are.

    Raises:
        ValueError: bad arguments (before any work). CorruptionLibraryMissing: no library.
    """
    tasks = _tasks(corruptions, severities)
    _check_seed(seed)
    _check_positive("batch_size", batch_size)
    _check_in_chans(in_chans)
    u8 = _uint8_images(images)
    y = _labels(labels, len(u8))
    compat.library()
    if cache is not None and not isinstance(cache, CorruptionCache):
        cache = CorruptionCache(cache, workers=workers)
    sets = (cache.corrupted(u8, tasks, dataset=dataset, seed=seed) if cache is not None
            else generate_corruptions(u8, tasks, seed=seed, workers=workers))
    accuracy: Dict[Task, float] = {}
    tasks_correct = torch.zeros(len(u8), dtype=torch.int64)
    for task, corrupted in sets:
        correct = _correct(model, corrupted, y, batch_size, in_chans)
        accuracy[task] = _accuracy(correct)
        tasks_correct += correct
    clean = _correct(model, u8, y, batch_size, in_chans)
    return CorruptionAccuracy(
        corruptions=tuple(corruptions), severities=tuple(int(s) for s in severities),
        accuracy={c: tuple(accuracy[(c, int(s))] for s in severities) for c in corruptions},
        clean_accuracy=_accuracy(clean), n=len(u8), seed=int(seed),
        examples_sha256=_fingerprint(u8), library=compat.library_version(),
        tasks_correct=tuple(tasks_correct.tolist()), clean_correct=tuple(clean.tolist()))


@dataclass(frozen=True)
class MeanCorruptionError:
    """Corruption errors relative to a baseline (Hendrycks & Dietterich 2019), in percent.

    Attributes:
        ce_percent: corruption -> 100 x (the model's error summed over severities) / (the
            baseline's).
        mce_percent: the mean of ``ce_percent`` over corruptions (100: as good as the baseline;
            lower is better).
    """

    ce_percent: Dict[str, float]
    mce_percent: float

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready."""
        return {"ce_percent": dict(self.ce_percent), "mce_percent": self.mce_percent}


def mean_corruption_error(result: CorruptionAccuracy, baseline: CorruptionAccuracy) -> MeanCorruptionError:
    """mCE of ``result`` relative to ``baseline`` (another model on the same corrupted examples).

    Raises:
        ValueError: the two were evaluated on other corruptions, severities, examples or seed, or
            the baseline makes no error on a corruption at any severity (its CE is undefined).
    """
    for what in ("corruptions", "severities", "examples_sha256", "seed", "library"):
        if getattr(result, what) != getattr(baseline, what):
            raise ValueError(f"the baseline was evaluated with other {what} ({getattr(baseline, what)!r}, not "
                             f"{getattr(result, what)!r}): evaluate both on the same corrupted examples")
    ce: Dict[str, float] = {}
    for c in result.corruptions:
        base = sum(baseline.error(c))
        if base <= 0.0:
            raise ValueError(f"the baseline makes no error on {c} at any severity: its corruption error is "
                             "undefined (use a weaker baseline or more examples)")
        ce[c] = 100.0 * sum(result.error(c)) / base
    return MeanCorruptionError(ce_percent=ce, mce_percent=float(np.mean(list(ce.values()))))


# --------------------------------------------------------------------------------------------
# Spatial grids
# --------------------------------------------------------------------------------------------

def _check_finite_values(name: str, values: Sequence[float], limit: float) -> Tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out or any(not math.isfinite(v) or abs(v) > limit for v in out) or len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct finite values within +-{limit}, got {list(values)}")
    return out


@dataclass(frozen=True)
class SpatialGrid:
    """The rotations and translations of a spatial grid attack: every combination is a point.

    Attributes:
        rotations: degrees, positive counter-clockwise (default -30..30 in 2-degree steps).
        translations_x: fractions of the width, positive to the right (default -0.1..0.1 in 0.05).
        translations_y: fractions of the height, positive downwards (default as x).
    """

    rotations: Tuple[float, ...] = tuple(float(a) for a in range(-30, 31, 2))
    translations_x: Tuple[float, ...] = (-0.1, -0.05, 0.0, 0.05, 0.1)
    translations_y: Tuple[float, ...] = (-0.1, -0.05, 0.0, 0.05, 0.1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotations", _check_finite_values("rotations", self.rotations, 180.0))
        object.__setattr__(self, "translations_x", _check_finite_values("translations_x", self.translations_x, 1.0))
        object.__setattr__(self, "translations_y", _check_finite_values("translations_y", self.translations_y, 1.0))

    @classmethod
    def uniform(cls, max_rotation: float = 30.0, rotation_steps: int = 31, max_translation: float = 0.1,
                translation_steps: int = 5) -> "SpatialGrid":
        """Evenly spaced values in [-max, max] (steps 1: only 0)."""
        def values(limit: float, steps: int) -> Tuple[float, ...]:
            _check_positive("steps", steps)
            # Rounded so that the grid's values read as written (0.05, not 0.05000000000000002).
            return (0.0,) if steps == 1 else tuple(round(float(v), 12) for v in np.linspace(-limit, limit, steps))
        translations = values(max_translation, translation_steps)
        return cls(values(max_rotation, rotation_steps), translations, translations)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(rotations, translations_y, translations_x)``."""
        return len(self.rotations), len(self.translations_y), len(self.translations_x)

    def points(self) -> List[Tuple[float, float, float]]:
        """``(rotation, tx, ty)`` for every point, in row-major order of :attr:`shape`."""
        return [(a, tx, ty) for a in self.rotations for ty in self.translations_y for tx in self.translations_x]


def spatial_transform(images: Tensor, rotation: float, tx: float, ty: float) -> Tensor:
    """Rotate about the centre, then translate: bilinear, zero padding.

    Args:
        images: ``(N, C, H, W)`` floating point.
        rotation: degrees, positive counter-clockwise.
        tx, ty: fractions of the width / height, positive right / down.

    Returns:
        The transformed images; the identity returns ``images`` itself (exactly the clean images).
    """
    if rotation == 0.0 and tx == 0.0 and ty == 0.0:
        return images
    height, width = images.shape[-2:]
    # Each output pixel p (x right, y down, from the image centre) samples the source at
    # R^-1 (p - t), R the counter-clockwise rotation, t the translation; affine_grid's
    # coordinates are these divided by half the width / height (align_corners=False: the image's
    # outer edges at -1 and 1, so pixel centres sit where the pixels are).
    angle = math.radians(float(rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    aspect = height / width
    theta = torch.tensor([[cos, -sin * aspect, -2.0 * (cos * tx - sin * ty * aspect)],
                          [sin / aspect, cos, -2.0 * (sin * tx / aspect + cos * ty)]],
                         dtype=images.dtype, device=images.device)
    grid = nn.functional.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class SpatialAccuracy:
    """A model's accuracy under a spatial grid.

    Attributes:
        grid: the grid.
        accuracy: ``grid.shape`` float64: the accuracy at each point.
        correct: ``(*grid.shape, N)`` bool: each example's correctness at each point.
        clean_accuracy: on the untransformed examples.
    """

    grid: SpatialGrid
    accuracy: Tensor
    correct: Tensor
    clean_accuracy: float

    @property
    def worst_correct(self) -> Tensor:
        """``(N,)``: correct at every point of the grid (Engstrom et al.'s grid attack)."""
        return self.correct.flatten(0, 2).all(dim=0)

    @property
    def worst_of_grid_accuracy(self) -> float:
        """The share of examples correct at every point."""
        return _accuracy(self.worst_correct)

    def accuracy_at(self, rotation: float, tx: float, ty: float) -> float:
        """The accuracy at one point of the grid."""
        g = self.grid
        return float(self.accuracy[g.rotations.index(rotation), g.translations_y.index(ty),
                                   g.translations_x.index(tx)])

    def lowest_point(self) -> Dict[str, float]:
        """The grid point of the lowest accuracy: ``{accuracy, rotation, tx, ty}``."""
        g = self.grid
        r, ty, tx = np.unravel_index(int(self.accuracy.argmin()), g.shape)
        return {"accuracy": float(self.accuracy.min()), "rotation": g.rotations[r],
                "tx": g.translations_x[tx], "ty": g.translations_y[ty]}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready (without the per-example table)."""
        return {"rotations": list(self.grid.rotations), "translations_x": list(self.grid.translations_x),
                "translations_y": list(self.grid.translations_y), "accuracy": self.accuracy.tolist(),
                "clean_accuracy": self.clean_accuracy, "worst_of_grid_accuracy": self.worst_of_grid_accuracy,
                "n": int(self.correct.shape[-1])}


@torch.inference_mode()
def evaluate_spatial(model: nn.Module, images: Tensor, labels: Tensor, *, grid: Optional[SpatialGrid] = None,
                     batch_size: int = 256, in_chans: Optional[int] = None) -> SpatialAccuracy:
    """Accuracy at each point of a rotation x translation grid, and the worst of the grid per example.

    Args:
        model: maps [0, 1] pixels to logits, on its device; run in eval mode (modes restored).
        images: ``(N, C, H, W)`` uint8 or [0, 1] floats.
        labels: ``(N,)`` integer labels.
        grid: the grid (default :class:`SpatialGrid`: 775 points, as many forward passes per image).
        batch_size: examples per forward pass.
        in_chans: the model's input channels when they differ from the images' (see
            :func:`evaluate_corruptions`).
    """
    grid = grid if grid is not None else SpatialGrid()
    _check_positive("batch_size", batch_size)
    _check_in_chans(in_chans)
    _check_images(images)
    x = images.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    y = _labels(labels, len(x))
    points = grid.points()
    correct = torch.empty(len(points), len(x), dtype=torch.bool)
    clean = torch.empty(len(x), dtype=torch.bool)
    device = device_of(model)
    with model_mode(model, "eval"):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            clean[start:start + len(xb)] = _predict(model, xb, in_chans).eq(yb).cpu()
            for p, (angle, tx, ty) in enumerate(points):
                moved = spatial_transform(xb, angle, tx, ty)
                correct[p, start:start + len(xb)] = _predict(model, moved, in_chans).eq(yb).cpu()
    correct = correct.view(*grid.shape, len(x))
    return SpatialAccuracy(grid=grid, accuracy=correct.double().mean(dim=-1), correct=correct,
                           clean_accuracy=_accuracy(clean))


# --------------------------------------------------------------------------------------------
# Corruption settings of a command line, and several models on the same corrupted examples
# --------------------------------------------------------------------------------------------

CORRUPTION_CACHE = Path.home() / ".cache" / "advvit" / "corruptions"
"""The default corruption cache: beside ``advvit.data``'s ``~/.cache/advvit/data``, so every run
on the same examples (any output folder, either command, any model) reuses what was generated."""


@dataclass(frozen=True)
class CorruptionSettings:
    """What a corruption evaluation runs, validated.

    Attributes:
        corruptions, severities: the (corruption, severity) grid, in order.
        cache_dir: the :class:`CorruptionCache` folder.
        workers: generation processes (None: the cores available; 0: this process).
    """

    corruptions: Tuple[str, ...]
    severities: Tuple[int, ...]
    cache_dir: Path
    workers: Optional[int]

    @property
    def tasks(self) -> int:
        """(corruption, severity) pairs."""
        return len(self.corruptions) * len(self.severities)


def _parse_corruption_names(text: str, option: str) -> Tuple[str, ...]:
    if text.strip().lower() == "all":
        return CORRUPTIONS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CORRUPTIONS]
    if not names or unknown:
        raise OptionError(f"{option} {','.join(unknown) or repr(text)} is unknown: use all or a "
                          f"comma list of {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise OptionError(f"{option} {text!r} names a corruption twice")
    return names


def _parse_severities(text: str, option: str) -> Tuple[int, ...]:
    if text.strip().lower() == "all":
        return SEVERITIES
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if not t.isdigit() or int(t) not in SEVERITIES]
    if not items or bad:
        raise OptionError(f"{option} {','.join(bad) or repr(text)}: severities are integers 1 to "
                          "5, e.g. 1,3,5 or all")
    if len(set(int(t) for t in items)) != len(items):
        raise OptionError(f"{option} {text!r} names a severity twice")
    return tuple(int(t) for t in items)


def corruption_settings(corruptions: str, severities: Optional[str], *,
                        cache_dir: Optional[Union[str, "os.PathLike[str]"]],
                        workers: Optional[int], seed: int,
                        options: Tuple[str, str, str, str]) -> CorruptionSettings:
    """Validate a command's corruption options (nothing is loaded or generated).

    Args:
        corruptions: ``all`` or a comma list of :data:`CORRUPTIONS`.
        severities: ``all`` or a comma list of 1..5 (None: all).
        cache_dir: the cache folder (None: :data:`CORRUPTION_CACHE`).
        workers: generation processes (None: the cores available; 0: this process).
        seed: the run's seed (the corruptions' seed: must be >= 0).
        options: the names of the corruption, severity, cache and worker options, for messages.

    Raises:
        OptionError: a bad value (named by its option), or the corruption library is missing.
    """
    names_option, severity_option, cache_option, workers_option = options
    names = _parse_corruption_names(corruptions, names_option)
    levels = _parse_severities(severities or "all", severity_option)
    if workers is not None and workers < 0:
        raise OptionError(f"{workers_option} must be >= 0 (0: in this process), got {workers}")
    if seed < 0:
        raise OptionError(f"--seed must be >= 0 with {names_option} (it seeds the corruptions), "
                          f"got {seed}")
    folder = check_folder(cache_dir if cache_dir is not None else CORRUPTION_CACHE, cache_option)
    try:
        compat.library()
    except compat.CorruptionLibraryMissing as err:
        raise OptionError(f"{names_option}: {err}") from None
    return CorruptionSettings(names, levels, folder, workers)


def run_corruptions(model: nn.Module, x: Tensor, y: Tensor, settings: CorruptionSettings, *,
                    seed: int, dataset: str, batch_size: int) -> CorruptionAccuracy:
    """Accuracy per (corruption, severity) of ``model`` on (x, y), through the disk cache.

    The examples are corrupted as the model takes them (its channels and size), as ImageNet-C
    corrupts the 224x224 model inputs.

    Args:
        model: on its device, taking [0, 1] pixels.
        x, y: the examples (CPU, [0, 1]) and labels.
        settings: from :func:`corruption_settings`.
        seed: the corruptions' seed.
        dataset: the data set and split (``fashion_mnist/val``): part of the cache key.
        batch_size: examples per forward pass.
    """
    cache = CorruptionCache(settings.cache_dir, workers=settings.workers)
    return evaluate_corruptions(model, x, y, corruptions=settings.corruptions,
                                severities=settings.severities, seed=seed, cache=cache,
                                dataset=dataset, batch_size=batch_size)


@dataclass(frozen=True)
class CorruptionStudy:
    """Several models, and optionally a baseline, on the same corrupted examples.

    Attributes:
        results: model name -> its accuracy, in order.
        baseline_name: the baseline's name (a model's own where it is one of them), or None.
        baseline: the baseline's accuracy, or None.
        mce: model name -> (its mCE against the baseline, or None and why there is none: the
            baseline makes no error on a corruption); empty without a baseline.
    """

    results: Dict[str, CorruptionAccuracy]
    baseline_name: Optional[str]
    baseline: Optional[CorruptionAccuracy]
    mce: Dict[str, Tuple[Optional[MeanCorruptionError], str]]

    def mce_percent(self, name: str) -> Optional[float]:
        """A model's mCE in percent, None where it has none."""
        m = self.mce[name][0]
        return m.mce_percent if m is not None else None

    def summary(self) -> Dict[str, CorruptionAccuracy]:
        """The models, then the baseline as ``<name> (baseline)`` unless it is one of them: each
        evaluation listed once."""
        out = dict(self.results)
        if self.baseline is not None and self.baseline_name not in self.results:
            out[f"{self.baseline_name} (baseline)"] = self.baseline
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: per model its accuracy (and mCE where there is one), the baseline's."""
        models = {}
        for name, r in self.results.items():
            m = self.mce[name][0] if name in self.mce else None
            models[name] = {**r.to_dict(), **(m.to_dict() if m is not None else {})}
        return {"models": models,
                "baseline": self.baseline.to_dict() if self.baseline is not None else None}


def corruption_study(models: Mapping[str, Tuple[str, nn.Module]], x: Tensor, y: Tensor,
                     settings: CorruptionSettings, *, seed: int, dataset: str, batch_size: int,
                     baseline: Optional[Tuple[str, str, nn.Module]] = None,
                     evaluate: Optional[Callable[[str, Callable[[], CorruptionAccuracy]],
                                                 CorruptionAccuracy]] = None) -> CorruptionStudy:
    """Each model (and the baseline) through :func:`run_corruptions`, once per set of weights.

    Args:
        models: name -> (the weights' identity, e.g. the file's sha256; the model).
        x, y, settings, seed, dataset, batch_size: as :func:`run_corruptions`.
        baseline: (name, weights' identity, model) the mCE is relative to, or None. Where its
            weights are a model's, that evaluation is used.
        evaluate: runs ``work()`` for one model as ``evaluate(name, work)`` (a progress line
            around it); default: just ``work()``.
    """
    done: Dict[str, CorruptionAccuracy] = {}

    def run(name: str, key: str, model: nn.Module) -> CorruptionAccuracy:
        if key not in done:
            def work() -> CorruptionAccuracy:
                return run_corruptions(model, x, y, settings, seed=seed, dataset=dataset,
                                       batch_size=batch_size)
            done[key] = evaluate(name, work) if evaluate is not None else work()
        return done[key]

    results = {name: run(name, key, model) for name, (key, model) in models.items()}
    base = run(*baseline) if baseline is not None else None
    mce: Dict[str, Tuple[Optional[MeanCorruptionError], str]] = {}
    if base is not None:
        for name, r in results.items():
            try:
                mce[name] = mean_corruption_error(r, base), ""
            except ValueError as err:  # a baseline without error on a corruption
                mce[name] = None, str(err)
    return CorruptionStudy(results, baseline[0] if baseline is not None else None, base, mce)
