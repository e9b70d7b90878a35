"""What attacks reveal about a trained model (thesis section 4.3, figures 1, 11-14, table 9).

Each analysis is a plain function of models that take [0, 1] pixels (any normalization inside,
``advvit.models.NormalizedModel``) and returns a frozen dataclass of CPU tensors; figures are
drawn from those results elsewhere. Inputs are processed in batches of ``batch_size`` on the
model's device, models run in eval mode (every submodule's mode is restored afterwards), and
random numbers are drawn per example from ``seed``, so results do not depend on the batch size.

* :func:`perturbation_images`: PGD-k perturbations of test images, seen as images
  (delta_viz = (delta + eps) / (2 eps), colour and grey): those of robust models look like the
  object, those of clean models like noise.
* :func:`class_visualization`: a targeted L2 PGD from uniform noise towards each class (robust
  models "draw" the class; Engstrom et al. 2019).
* :func:`semantic_score`: how often judge models classify the perturbation images (and their
  negatives) as the true class, next to random-sign perturbations of the same eps clipped to the
  same [0, 1] box: where pixels saturate, the box alone leaks the object's outline into any
  perturbation, and the control measures that leak.
* :func:`transfer_matrix`: adversarial examples crafted on each source model (the evaluation
  runner, :mod:`advvit.robustness`) classified by each target model; the diagonal is the
  white-box robust accuracy.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from advvit.analysis._common import (LUMA, TINY, batches, check_analysis_norm, check_batch_size,
                                      device_of, example_generator)
from advvit.attacks import check_attack_args, check_eps, model_mode, pgd
from advvit.attack_names import ANALYZE_RESTARTS, ATTACKS, TRANSFER_ATTACKS, attack_spec
from advvit.robustness import EnsembleResult
from advvit.suites import run_attack

__all__ = [
    "OnBatch", "THESIS_CLASS_VIZ_EPS", "THESIS_INPUT_SHAPE", "default_class_viz_eps",
    "perturbation_viz", "to_grey", "PerturbationImages", "perturbation_images",
    "ClassVisualization", "class_visualization",
    "SEMANTIC_KINDS", "random_sign_perturbation", "semantic_images", "topk_correct",
    "SemanticScore", "semantic_score",
    "TRANSFER_ATTACKS", "TransferMatrix", "transfer_matrix",
]

OnBatch = Callable[[int], None]
"""Progress callback: called with the number of images a batch just finished."""

THESIS_CLASS_VIZ_EPS = 15.0
"""The thesis's L2 radius for class visualization (PGD-100 at 224x224x3)."""
THESIS_INPUT_SHAPE = (3, 224, 224)



# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------







def _check_images(x: Tensor, y: Optional[Tensor] = None) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 4 or len(x) == 0:
        raise ValueError("x must be a non-empty floating-point batch of images (N, C, H, W) in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"x must hold pixels in [0, 1] (found [{x.min().item():.4g}, "
                         f"{x.max().item():.4g}]); normalize inside the model")
    if y is not None and (not torch.is_tensor(y) or y.shape != x.shape[:1]):
        raise ValueError(f"y must hold one label per image: got shape {tuple(getattr(y, 'shape', ()))} "
                         f"for {len(x)} images")




def _per_example(t: Tensor) -> Tensor:
    """An (n,) tensor viewed to broadcast over (n, C, H, W)."""
    return t.view(-1, *([1] * 3))




def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Logits of ``x`` (CPU, float32), in eval mode without gradients."""
    device = device_of(model)
    out = []
    with model_mode(model, "eval"), torch.no_grad():
        for sl in batches(len(x), batch_size):
            out.append(model(x[sl].to(device)).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# 1. Perturbation images
# --------------------------------------------------------------------------------------------

def _viz_scale(delta: Tensor, eps: float, norm: str) -> Tensor:
    """(n,) the |delta| that maps to 0 and 1: eps for Linf (the thesis's scaling); for L2, each
    image's largest |delta| (an L2 ball bounds no single pixel)."""
    if norm == "linf":
        return torch.full((len(delta),), float(eps))
    return delta.flatten(1).abs().amax(1).clamp_min(TINY)


def perturbation_viz(delta: Tensor, scale: float | Tensor) -> Tensor:
    """A perturbation as an image: (delta + s) / (2 s), clipped to [0, 1].

    Args:
        delta: (n, C, H, W) perturbations.
        scale: s, a float (Linf: eps) or one per image.
    """
    s = _per_example(torch.as_tensor(scale, dtype=delta.dtype).expand(len(delta)))
    return ((delta + s) / (2 * s)).clamp(0.0, 1.0)


def to_grey(images: Tensor) -> Tensor:
    """(n, C, H, W) images in [0, 1] -> (n, 1, H, W) grey (BT.601 luma for 3 channels)."""
    if images.shape[1] == 1:
        return images.clone()
    if images.shape[1] != 3:
        raise ValueError(f"to_grey takes 1 or 3 channels, got {images.shape[1]}")
    weights = torch.tensor(LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


@dataclass(frozen=True)
class PerturbationImages:
    """:func:`perturbation_images`' result: n test images, their adversarial versions, and
    what the model says about both.

    Attributes:
        x: (n, C, H, W) clean images.
        y: (n,) true labels.
        x_adv: (n, C, H, W) adversarial images (in the eps-ball and in [0, 1]).
        clean_pred: (n,) the model's label for x.
        adv_pred: (n,) the model's label for x_adv.
        eps, norm, steps, step_size, random_init, seed: the attack.
    """

    x: Tensor
    y: Tensor
    x_adv: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    eps: float
    norm: str
    steps: int
    step_size: float
    random_init: bool
    seed: int

    @property
    def n(self) -> int:
        """Number of images."""
        return len(self.y)

    @property
    def delta(self) -> Tensor:
        """(n, C, H, W) x_adv - x."""
        return self.x_adv - self.x

    @property
    def scale(self) -> Tensor:
        """(n,) the |delta| shown as 0 and 1: eps (Linf); each image's largest |delta| (L2)."""
        return _viz_scale(self.delta, self.eps, self.norm)

    @property
    def delta_viz(self) -> Tensor:
        """(n, C, H, W) the perturbation as an image, (delta + eps) / (2 eps) for Linf."""
        return perturbation_viz(self.delta, self.scale)

    @property
    def delta_grey(self) -> Tensor:
        """(n, 1, H, W) :attr:`delta_viz` in grey."""
        return to_grey(self.delta_viz)

    @property
    def clean_accuracy(self) -> float:
        """Fraction of x the model classifies correctly."""
        return float((self.clean_pred == self.y).double().mean())

    @property
    def adversarial_accuracy(self) -> float:
        """Fraction of x_adv the model classifies correctly."""
        return float((self.adv_pred == self.y).double().mean())

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: the accuracies, the mean |delta|, each image's label and predictions (the
        images themselves are left out)."""
        return {"clean_accuracy": self.clean_accuracy,
                "adversarial_accuracy": self.adversarial_accuracy,
                "mean_abs_delta": float(self.delta.abs().mean()), "labels": self.y.tolist(),
                "clean_pred": self.clean_pred.tolist(), "adv_pred": self.adv_pred.tolist()}


def _random_start(x: Tensor, eps: float, norm: str, seed: int, indices: range) -> Tensor:
    """Per-example random starts in the eps-ball (uniform in Linf; uniform in the L2 ball)."""
    starts = []
    d = x[0].numel()
    for row, i in zip(x, indices):
        g = example_generator(seed, 1, i)
        if norm == "linf":
            delta = (torch.rand(row.shape, generator=g) * 2 - 1) * eps
        else:
            direction = torch.randn(row.shape, generator=g)
            radius = eps * torch.rand((), generator=g).pow(1.0 / d)
            delta = direction / direction.norm().clamp_min(TINY) * radius
        starts.append(delta)
    return (x + torch.stack(starts).to(x.device, x.dtype)).clamp(0.0, 1.0)


def perturbation_images(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
                        steps: int = 100, step_size: Optional[float] = None,
                        random_init: bool = False, seed: int = 0, batch_size: int = 64,
                        on_batch: Optional[OnBatch] = None) -> PerturbationImages:
    """Untargeted PGD-k (``advvit.attacks.pgd``) on test images, kept to be looked at.

    The attack starts from the clean image by default, so the picture is the model's gradient
    path alone (a random start would leave its noise in every pixel the steps do not saturate);
    ``random_init`` starts from a per-example random point of the ball instead.

    Args:
        model: maps [0, 1] pixels to logits.
        x: (n, C, H, W) images in [0, 1]; y: (n,) labels.
        eps: the radius (``advvit.attacks.check_eps`` with x's shape).
        norm: "linf" (the thesis) or "l2".
        steps: PGD steps (the thesis: 100).
        step_size: PGD's step (default 1.5 * eps / steps).
        random_init: start from a random point of the ball (seeded per example).
        seed: seeds the random start.
        batch_size: images per batch.
        on_batch: progress callback (images finished per batch).

    Returns:
        A :class:`PerturbationImages`.
    """
    _check_images(x, y)
    check_batch_size(batch_size)
    check_analysis_norm(norm)
    check_attack_args(eps, steps, norm, step_size)
    check_eps(eps, norm, input_shape=tuple(x.shape[1:]), name="eps")
    device = device_of(model)
    advs = []
    for sl in batches(len(x), batch_size):
        xb, yb = x[sl].to(device), y[sl].to(device)
        start = _random_start(xb, eps, norm, seed, range(sl.start, sl.stop)) if random_init else None
        advs.append(pgd(model, xb, yb, eps=eps, norm=norm, steps=steps, step_size=step_size,
                        random_init=False, x_init=start).cpu())
        if on_batch is not None:
            on_batch(sl.stop - sl.start)
    x_adv = torch.cat(advs)
    x_cpu = x.detach().cpu()
    return PerturbationImages(
        x=x_cpu, y=y.detach().cpu(), x_adv=x_adv,
        clean_pred=_predict(model, x_cpu, batch_size).argmax(1),
        adv_pred=_predict(model, x_adv, batch_size).argmax(1),
        eps=float(eps), norm=norm, steps=steps,
        step_size=float(step_size if step_size is not None else 1.5 * eps / steps),
        random_init=random_init, seed=seed)


# --------------------------------------------------------------------------------------------
# 2. Class visualization
# --------------------------------------------------------------------------------------------

def default_class_viz_eps(input_shape: Sequence[int]) -> float:
    """The thesis's L2 radius 15 at 224x224x3, scaled with sqrt(input dimension): an L2 ball
    of radius 15 sqrt(d / d_thesis) allows the same root-mean-square change per pixel."""
    d = math.prod(int(s) for s in input_shape)
    return THESIS_CLASS_VIZ_EPS * math.sqrt(d / math.prod(THESIS_INPUT_SHAPE))


@dataclass(frozen=True)
class ClassVisualization:
    """:func:`class_visualization`'s result: one image per (class, repeat).

    Attributes:
        targets: (m,) the class each image was pushed towards.
        start: (m, C, H, W) the starting images (uniform noise unless given).
        images: (m, C, H, W) the images after the targeted attack.
        pred: (m,) the model's label for each image.
        confidence: (m,) the model's softmax probability of the target class at ``images``.
        start_confidence: (m,) the same at ``start``.
        eps, steps, step_size, seed: the attack (targeted L2 PGD).
    """

    targets: Tensor
    start: Tensor
    images: Tensor
    pred: Tensor
    confidence: Tensor
    start_confidence: Tensor
    eps: float
    steps: int
    step_size: float
    seed: int

    @property
    def success(self) -> Tensor:
        """(m,) whether the model now gives the target class."""
        return self.pred == self.targets

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready (without the images)."""
        return {"targets": self.targets.tolist(), "pred": self.pred.tolist(),
                "confidence": self.confidence.tolist(),
                "start_confidence": self.start_confidence.tolist(),
                "success_rate": float(self.success.double().mean())}


def _uniform_noise(shape: Sequence[int], seed: int, indices: range) -> Tensor:
    return torch.stack([torch.rand(tuple(shape), generator=example_generator(seed, 2, i)) for i in indices])


def class_visualization(model: nn.Module, input_shape: Sequence[int], classes: Sequence[int], *,
                        per_class: int = 1, eps: Optional[float] = None, steps: int = 100,
                        step_size: Optional[float] = None, start: Optional[Tensor] = None,
                        seed: int = 0, batch_size: int = 64,
                        on_batch: Optional[OnBatch] = None) -> ClassVisualization:
    """Push images towards each class with a targeted L2 PGD (thesis section 4.3.2).

    From uniform noise (seeded per image) or from ``start``, PGD-``steps`` minimises the
    cross-entropy of the target class inside an L2 ball of radius ``eps`` around the start,
    staying in [0, 1]. What a robust model's gradient draws looks like the class.

    Args:
        model: maps [0, 1] pixels to logits.
        input_shape: one image's (C, H, W).
        classes: the target classes, each ``per_class`` times (images are ordered class by
            class).
        per_class: images per class.
        eps: the L2 radius (default :func:`default_class_viz_eps`, the thesis's 15 scaled).
        steps: PGD steps (the thesis: 100).
        step_size: PGD's step (default 1.5 * eps / steps).
        start: (len(classes) * per_class, C, H, W) starting images in [0, 1] instead of noise.
        seed: seeds the noise.
        batch_size: images per batch.
        on_batch: progress callback (images finished per batch).
    """
    check_batch_size(batch_size)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    if len(classes) == 0:
        raise ValueError("classes is empty: give at least one class index")
    eps = default_class_viz_eps(shape) if eps is None else eps
    check_attack_args(eps, steps, "l2", step_size)
    check_eps(eps, "l2", input_shape=shape, name="eps")
    targets = torch.tensor([int(c) for c in classes for _ in range(per_class)], dtype=torch.long)
    m = len(targets)
    if start is None:
        start = _uniform_noise(shape, seed, range(m))
    else:
        _check_images(start)
        if tuple(start.shape) != (m, *shape):
            raise ValueError(f"start must have shape {(m, *shape)} (one image per class and "
                             f"repeat), got {tuple(start.shape)}")
        start = start.detach().cpu()
    device = device_of(model)
    out = []
    for sl in batches(m, batch_size):
        xb, tb = start[sl].to(device), targets[sl].to(device)
        out.append(pgd(model, xb, tb, eps=eps, norm="l2", steps=steps, step_size=step_size,
                       random_init=False, targeted=True).cpu())
        if on_batch is not None:
            on_batch(sl.stop - sl.start)
    images = torch.cat(out)
    logits, logits0 = _predict(model, images, batch_size), _predict(model, start, batch_size)
    pick = targets.view(-1, 1)
    return ClassVisualization(
        targets=targets, start=start, images=images, pred=logits.argmax(1),
        confidence=logits.softmax(1).gather(1, pick).squeeze(1),
        start_confidence=logits0.softmax(1).gather(1, pick).squeeze(1),
        eps=float(eps), steps=steps,
        step_size=float(step_size if step_size is not None else 1.5 * eps / steps), seed=seed)


# --------------------------------------------------------------------------------------------
# 3. Semantic score
# --------------------------------------------------------------------------------------------

SEMANTIC_KINDS = ("clean", "perturbation", "negative", "random", "random-negative")
"""The image sets a judge classifies: the clean images (the reference), the perturbation images,
their negatives, and the random-sign control and its negative."""


def random_sign_perturbation(x: Tensor, eps: float, norm: str, seed: int,
                             indices: Optional[Sequence[int]] = None) -> Tensor:
    """Random-sign perturbations of radius eps, clipped to the [0, 1] box as an attack's are.

    Linf: eps times random signs (a corner of the ball); L2: random signs scaled to L2 norm
    eps. Where x is 0 or 1 the box cuts the perturbation to one side, which outlines the
    object in any perturbation: this is the control for that leak.

    Args:
        x: (n, C, H, W) clean images in [0, 1].
        eps, norm: the attack's radius and norm.
        seed: seeds the signs, per example.
        indices: each image's index for its seed (default 0..n-1).

    Returns:
        (n, C, H, W) delta with x + delta in [0, 1].
    """
    indices = range(len(x)) if indices is None else indices
    shape = tuple(x.shape[1:])
    signs = torch.stack([torch.randint(0, 2, shape, generator=example_generator(seed, 3, int(i))) * 2 - 1
                         for i in indices]).to(x.dtype)
    step = eps if norm == "linf" else eps / math.sqrt(math.prod(shape))
    return (x + step * signs.to(x.device)).clamp(0.0, 1.0) - x


def semantic_images(p: PerturbationImages, *, seed: int = 0) -> Dict[str, Tensor]:
    """The image sets of :data:`SEMANTIC_KINDS` for one source's perturbations.

    The perturbation images are ``delta_viz`` (the thesis's scaling into [0, 1]); a negative is
    1 - delta_viz (the image of -delta: an untargeted attack removes the true class, so the
    object may show in either sign); the control is :func:`random_sign_perturbation` of the same
    images, shown with the same scaling.
    """
    control = random_sign_perturbation(p.x, p.eps, p.norm, seed)
    control_viz = perturbation_viz(control, _viz_scale(control, p.eps, p.norm))
    viz = p.delta_viz
    return {"clean": p.x, "perturbation": viz, "negative": 1.0 - viz,
            "random": control_viz, "random-negative": 1.0 - control_viz}


def topk_correct(model: nn.Module, images: Tensor, y: Tensor, *, k: int = 5,
                 batch_size: int = 128) -> Tuple[Tensor, Tensor]:
    """-> ((n,) top-1 correct, (n,) top-k correct) of ``model`` on ``images`` against ``y``."""
    logits = _predict(model, images, batch_size)
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return top[:, 0] == y, (top == y.view(-1, 1)).any(1)


@dataclass(frozen=True)
class SemanticScore:
    """:func:`semantic_score`'s result: accuracies as source x judge x kind tables.

    Attributes:
        sources: the models whose perturbations are judged (rows).
        judges: the classifying models (columns).
        kinds: :data:`SEMANTIC_KINDS` (the last axis).
        top1: (S, J, K) top-1 accuracy against the true labels.
        topk: (S, J, K) top-``k`` accuracy.
        k: the k of ``topk`` (5, or the number of classes when fewer).
        num_classes: the judges' classes (chance is 1 / num_classes, k / num_classes).
        n: images per source.
        eps, norm, seed: the perturbations' radius and norm; the control's seed.
    """

    sources: Tuple[str, ...]
    judges: Tuple[str, ...]
    kinds: Tuple[str, ...]
    top1: Tensor
    topk: Tensor
    k: int
    num_classes: int
    n: int
    eps: float
    norm: str
    seed: int

    @property
    def chance_top1(self) -> float:
        """Top-1 accuracy of guessing."""
        return 1.0 / self.num_classes

    @property
    def chance_topk(self) -> float:
        """Top-k accuracy of guessing."""
        return self.k / self.num_classes

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: the tables (``top1``, ``top<k>``), chance and one row per pair."""
        return {"sources": list(self.sources), "judges": list(self.judges),
                "kinds": list(self.kinds), "top1": self.top1.tolist(),
                f"top{self.k}": self.topk.tolist(), "chance_top1": self.chance_top1,
                f"chance_top{self.k}": self.chance_topk, "rows": self.rows()}

    def rows(self) -> list:
        """One dict per (source, judge): top-1 and top-k of every kind, for a table."""
        out = []
        for s, source in enumerate(self.sources):
            for j, judge in enumerate(self.judges):
                row = {"source": source, "judge": judge}
                for kk, kind in enumerate(self.kinds):
                    row[f"{kind}_top1"] = float(self.top1[s, j, kk])
                    row[f"{kind}_top{self.k}"] = float(self.topk[s, j, kk])
                out.append(row)
        return out


def semantic_score(sources: Mapping[str, PerturbationImages], judges: Mapping[str, nn.Module], *,
                   k: int = 5, seed: int = 0, batch_size: int = 128,
                   on_batch: Optional[OnBatch] = None) -> SemanticScore:
    """The semantic score of perturbations (thesis table 9), with its random-sign control.

    Every judge classifies, for every source, the clean images, the perturbation images, their
    negatives, and the random-sign control images and their negatives
    (:func:`semantic_images`); accuracy is against the true labels. A semantic perturbation
    scores well above the control; a noise-like one scores near chance, as the control does on
    images without saturated pixels.

    Args:
        sources: name -> :func:`perturbation_images` result (the same images for every source
            make the rows comparable, but this is not required).
        judges: name -> classifier taking [0, 1] pixels of the sources' image shape.
        k: top-k accuracy besides top-1 (the thesis: 5).
        seed: seeds the random-sign control (per example).
        batch_size: images per judge batch.
        on_batch: progress callback (images classified, per image set and judge).
    """
    if not sources or not judges:
        raise ValueError("semantic_score needs at least one source and one judge")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    check_batch_size(batch_size)
    S, J, K = len(sources), len(judges), len(SEMANTIC_KINDS)
    top1 = torch.zeros(S, J, K, dtype=torch.float64)
    topk = torch.zeros_like(top1)
    num_classes = None
    for s, p in enumerate(sources.values()):
        sets = semantic_images(p, seed=seed)
        for j, judge in enumerate(judges.values()):
            for kk, kind in enumerate(SEMANTIC_KINDS):
                c1, ck = topk_correct(judge, sets[kind], p.y, k=k, batch_size=batch_size)
                top1[s, j, kk], topk[s, j, kk] = c1.double().mean(), ck.double().mean()
                if on_batch is not None:
                    on_batch(p.n)
            if num_classes is None:
                num_classes = int(_predict(judge, p.x[:1], 1).shape[1])
    first = next(iter(sources.values()))
    return SemanticScore(sources=tuple(sources), judges=tuple(judges), kinds=SEMANTIC_KINDS,
                         top1=top1, topk=topk, k=min(k, num_classes), num_classes=num_classes,
                         n=first.n, eps=first.eps, norm=first.norm, seed=seed)


# --------------------------------------------------------------------------------------------
# 4. Transfer matrix
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransferMatrix:
    """:func:`transfer_matrix`'s result.

    Attributes:
        sources: models the adversarial examples were crafted on (rows).
        targets: models that classify them (columns).
        accuracy: (S, T) target accuracy on the source's adversarial examples (all n images:
            where the source's attack did not succeed, or the source was wrong already, the
            runner keeps the clean image, as ``advvit.eval`` does). Where a target is the source
            itself this is the runner's white-box robust accuracy.
        transfer_accuracy: (S, T) target accuracy on the images whose attack fooled the source
            (the successful adversarial examples alone); NaN when none did.
        clean_accuracy: (T,) each target's accuracy on the clean images.
        fooled: (S, n) whether the source's attack turned a correct prediction wrong.
        white_box: (S, T) True where the target is the source (the same module).
        seconds: (S,) crafting time per source.
        attack, eps, norm, steps, restarts, seed, n: how the examples were crafted.
    """

    sources: Tuple[str, ...]
    targets: Tuple[str, ...]
    accuracy: Tensor
    transfer_accuracy: Tensor
    clean_accuracy: Tensor
    fooled: Tensor
    white_box: Tensor
    seconds: Tensor
    attack: str
    eps: float
    norm: str
    steps: int
    restarts: int
    seed: int
    n: int

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: the matrices, each source's count of fooled examples and crafting time."""
        return {"sources": list(self.sources), "targets": list(self.targets),
                "accuracy": self.accuracy.tolist(),
                "transfer_accuracy": self.transfer_accuracy.tolist(),
                "clean_accuracy": self.clean_accuracy.tolist(),
                "white_box": self.white_box.tolist(), "n_fooled": self.fooled.sum(1).tolist(),
                "seconds": self.seconds.tolist()}


def _craft(model: nn.Module, x: Tensor, y: Tensor, *, attack: str, eps: float, norm: str,
           steps: int, restarts: int, step_size: Optional[float], seed: int, batch_size: int,
           on_batch: Optional[OnBatch]) -> EnsembleResult:
    """The source's adversarial examples through the evaluation runner (as ``advvit.eval``)."""
    hook = None
    if on_batch is not None:
        def hook(_name: str, _b: int, _n: int) -> None:
            on_batch(batch_size)
    num_classes = int(_predict(model, x[:1], 1).shape[1]) if attack == "apgd-ce" else None
    spec = attack_spec(attack, steps=steps, restarts=restarts, step_size=step_size)
    return run_attack(model, x, y, spec, eps=eps, norm=norm, seed=seed, batch_size=batch_size,
                      device=device_of(model), keep_adv=True, num_classes=num_classes,
                      on_batch=hook)


def transfer_matrix(sources: Mapping[str, nn.Module], x: Tensor, y: Tensor, *,
                    targets: Optional[Mapping[str, nn.Module]] = None, attack: str = "pgd",
                    eps: float, norm: str = "linf", steps: Optional[int] = None,
                    restarts: int = ANALYZE_RESTARTS, step_size: Optional[float] = None, seed: int = 0,
                    batch_size: int = 250, on_batch: Optional[OnBatch] = None) -> TransferMatrix:
    """Adversarial examples crafted on each source, classified by each target.

    Each source is attacked by the one evaluation runner (:func:`advvit.robustness.run_attacks`,
    the attacks and seeding of ``advvit.eval``), so the diagonal equals ``advvit.eval``'s
    white-box robust accuracy with the same attack, seed and batch size.

    Args:
        sources: name -> model the examples are crafted on.
        x: (n, C, H, W) images in [0, 1]; y: (n,) labels.
        targets: name -> model that classifies them (default: the sources).
        attack: one of :data:`TRANSFER_ATTACKS`.
        eps, norm: the radius (``check_eps`` with x's shape) and norm.
        steps: iterations (default: the attack's ``analyze_steps`` in
            :data:`advvit.attack_names.ATTACKS`: PGD 10, APGD-CE 100; FGSM is one step).
        restarts: restarts per example (PGD, APGD-CE).
        step_size: PGD / FGSM step (default 1.5 * eps / steps).
        seed: the attacks' seed (re-seeded per batch, as in the runner).
        batch_size: the runner's batch size.
        on_batch: progress callback (images attacked per batch).
    """
    if attack not in TRANSFER_ATTACKS:
        raise ValueError(f"attack must be one of {TRANSFER_ATTACKS}, got {attack!r}")
    if not sources:
        raise ValueError("transfer_matrix needs at least one source model")
    targets = dict(sources) if targets is None else dict(targets)
    _check_images(x, y)
    check_batch_size(batch_size)
    if attack == "fgsm" or steps is None:
        steps = ATTACKS[attack].analyze_steps
    check_attack_args(eps, steps, norm, step_size)
    check_eps(eps, norm, input_shape=tuple(x.shape[1:]), name="eps")
    x, y = x.detach().cpu(), y.detach().cpu().long()
    S, T, n = len(sources), len(targets), len(y)
    acc = torch.zeros(S, T, dtype=torch.float64)
    transfer = torch.full_like(acc, math.nan)
    fooled = torch.zeros(S, n, dtype=torch.bool)
    white = torch.zeros(S, T, dtype=torch.bool)
    seconds = torch.zeros(S, dtype=torch.float64)
    clean = torch.tensor([float((_predict(m, x, batch_size).argmax(1) == y).double().mean())
                          for m in targets.values()], dtype=torch.float64)
    for s, source in enumerate(sources.values()):
        started = time.perf_counter()
        result = _craft(source, x, y, attack=attack, eps=eps, norm=norm, steps=steps,
                        restarts=restarts, step_size=step_size, seed=seed, batch_size=batch_size,
                        on_batch=on_batch)
        seconds[s] = time.perf_counter() - started
        fooled[s] = result.clean & ~result.robust
        for t, target in enumerate(targets.values()):
            if target is source:
                # The runner's own verdict: the same forward passes that decided each example.
                correct, white[s, t] = result.robust, True
            else:
                correct = _predict(target, result.x_adv, batch_size).argmax(1) == y
            acc[s, t] = correct.double().mean()
            if fooled[s].any():
                transfer[s, t] = correct[fooled[s]].double().mean()
    return TransferMatrix(sources=tuple(sources), targets=tuple(targets), accuracy=acc,
                          transfer_accuracy=transfer, clean_accuracy=clean, fooled=fooled,
                          white_box=white, seconds=seconds, attack=attack, eps=float(eps),
                          norm=norm, steps=steps, restarts=restarts, seed=seed, n=n)
