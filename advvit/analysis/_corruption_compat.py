"""The one place that calls the ImageNet-C corruption library, and what it needs to work here.

The library is ``imagecorruptions-imaug`` (import name ``imagecorruptions``): the maintained
release of the reference code of Hendrycks & Dietterich (2019) as generalised by Michaelis et al.
(2019) to any image size and without Wand / ImageMagick (its motion blur is a numpy shift-and-add
of a Gaussian line kernel, not ImageMagick's; its frost photographs ship as package data). The
earlier ``imagecorruptions`` 1.1.2 no longer imports on current dependencies (``pkg_resources``
is gone from setuptools >= 81, ``np.float_`` from numpy 2, ``multichannel=`` from scikit-image);
the maintained release fixes those. What remains is handled here:

* Randomness. Seven corruptions draw from numpy's global legacy RNG (gaussian and shot noise,
  motion blur's angle, snow, frost's photograph and crop, fog's plasma fractal, elastic
  transform's displacements), glass blur from numba's own RNG (seeded through its ``seed``
  argument, else from an unseeded ``default_rng``) and impulse noise from scikit-image's ``rng``
  (its ``seed`` argument, else unseeded); the other six are deterministic. :func:`apply` seeds
  all three from one integer and restores the global numpy state after, so a caller's
  ``np.random`` stream is untouched.
* Frost's photographs. The release draws one of its six photographs (``randint(6)``), where
  ImageNet-C's ``make_imagenet_c.py`` and ``imagecorruptions`` 1.1.2 draw from the first five
  (``randint(5)``; the sixth ships unused). The photograph is frost's first draw, so
  :func:`apply` keeps ImageNet-C's five by rejection: a seed whose first ``randint(6)`` is the
  sixth is replaced by the next seed derived from it that draws one of the five (uniform over
  them; every other seed, 5 in 6, gives the release's own result). :func:`library_version`
  says so, so corrupted sets made without it are not mixed with these.
* Sizes below 32 pixels. The library's ``corrupt()`` refuses them, although every corruption
  function runs at any size from 8x8 up (checked at 8 ... 224, square and not); :func:`apply`
  calls the functions themselves, then converts to uint8 as ``corrupt()`` does.
* Start-up cost. Glass blur's pixel shuffle is a numba function compiled on first use (about 4 s
  on a 2-core CPU, in every new process, so in every worker); its on-disk cache is switched on,
  so it is compiled once per installation.
* Frost decodes its photograph from the package (``cv2.imread``) on every call: 10-25 ms, 90% of
  frost's time and 45% of all 15 corruptions' at 28x28. The library module's ``cv2`` is given a
  view of OpenCV whose ``imread`` keeps the decoded photographs (a copy per call); OpenCV itself
  and every other caller are untouched, and the results are identical.

Install: ``pip install 'advvit[corruptions]'``. Without the library this module still imports;
the first corruption raises :class:`CorruptionLibraryMissing` saying how to install it.
"""
from __future__ import annotations

import functools
import inspect
from importlib import metadata
from types import ModuleType
from typing import Any, Callable, Dict, Tuple

import numpy as np

__all__ = ["DISTRIBUTION", "FROST_PHOTOGRAPHS", "CorruptionLibraryMissing", "library", "library_version", "corruption_names",
           "apply"]

DISTRIBUTION = "imagecorruptions-imaug"
FROST_PHOTOGRAPHS = 5
"""ImageNet-C's frost photographs (``make_imagenet_c.py``: ``randint(5)``); the release has six."""
_RELEASE_FROST_PHOTOGRAPHS = 6
_INSTALL_HINT = ("the common corruptions need the imagecorruptions-imaug package: "
                 "pip install 'advvit[corruptions]' (or pip install imagecorruptions-imaug)")


class CorruptionLibraryMissing(ImportError):
    """The corruption library is not installed (the message says how to install it)."""


@functools.lru_cache(maxsize=1)
def library() -> ModuleType:
    """The imported library, with its glass-blur JIT cache switched on.

    Raises:
        CorruptionLibraryMissing: it is not installed.
    """
    try:
        import imagecorruptions
        from imagecorruptions import corruptions as impl
    except ImportError as err:
        raise CorruptionLibraryMissing(f"{_INSTALL_HINT} ({err})") from err
    shuffle = getattr(impl, "_shuffle_pixels_njit_glass_blur", None)
    if shuffle is not None and hasattr(shuffle, "enable_caching"):
        shuffle.enable_caching()
    if isinstance(getattr(impl, "cv2", None), ModuleType):
        impl.cv2 = _OpenCVKeepingImages(impl.cv2)
    return imagecorruptions


class _OpenCVKeepingImages:
    """OpenCV as the library sees it: ``imread`` keeps what it decoded; the rest is OpenCV's."""

    def __init__(self, cv2: ModuleType) -> None:
        self._cv2 = cv2
        self._read = functools.lru_cache(maxsize=16)(lambda path: cv2.imread(path))

    def imread(self, path: Any, *args: Any) -> Any:
        if args:
            return self._cv2.imread(path, *args)
        image = self._read(str(path))
        return None if image is None else image.copy()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cv2, name)


def library_version() -> str:
    """``"imagecorruptions-imaug 1.1.5 (frost: 5 photographs)"``: recorded with every corrupted
    set and result (the note: frost as ImageNet-C draws it, see the module's docstring)."""
    library()
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # imported from a source tree, not installed
        version = "unknown"
    return f"{DISTRIBUTION} {version} (frost: {FROST_PHOTOGRAPHS} photographs)"


def corruption_names() -> Tuple[str, ...]:
    """The library's 15 common corruptions, in ImageNet-C order."""
    return tuple(library().get_corruption_names("common"))


@functools.lru_cache(maxsize=None)
def _function(name: str) -> Tuple[Callable[..., Any], bool]:
    fn = library().corruption_dict[name]
    return fn, "seed" in inspect.signature(fn).parameters


def apply(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One library corruption of one RGB image, all its randomness drawn from ``seed``.

    Args:
        image: ``(H, W, 3)`` uint8.
        name: a corruption name (:func:`corruption_names`).
        severity: 1 to 5.
        seed: in [0, 2**32).

    Returns:
        ``(H, W, 3)`` uint8, truncated from the library's float output as its ``corrupt()`` does.
    """
    from PIL import Image

    fn, takes_seed = _function(name)
    if name == "frost":
        seed = _frost_seed(seed)
    kwargs: Dict[str, int] = {"seed": seed} if takes_seed else {}
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        out = fn(Image.fromarray(image), severity, **kwargs)
    finally:
        np.random.set_state(saved)
    return np.uint8(np.asarray(out))


def _frost_seed(seed: int) -> int:
    """``seed``, or else the first seed derived from it, whose first ``randint(6)`` (the
    release's photograph) is one of ImageNet-C's first five."""
    candidate, k = seed, 0
    while np.random.RandomState(candidate).randint(_RELEASE_FROST_PHOTOGRAPHS) >= FROST_PHOTOGRAPHS:
        k += 1
        candidate = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
    return candidate
