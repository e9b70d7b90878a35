"""White-box attacks on image classifiers, as pure functions of (model, x, y).

Inputs and outputs are pixels in [0, 1] (NCHW); any normalization belongs inside the model. The
attacks compute gradients with respect to the input only: the model's parameters are frozen for
the attack and restored afterwards, so no parameter gradient is computed or accumulated, and the
model's train/eval mode is set as asked and restored, also when the attack raises.

This module imports torch only, so other projects can use it without timm.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pgd", "fgsm", "NORMS", "frozen_model", "project", "project_l1", "default_step_size",
           "check_attack_args", "check_eps", "max_eps", "model_mode"]

NORMS = ("linf", "l2", "l1")
ModelMode = Literal["eval", "train", "keep"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Keeps the L2 direction finite where a gradient is exactly zero.
_TINY = 1e-12
# The share of coordinates one L1 step moves: SLIDE's 99th percentile (Tramer & Boneh 2019).
_L1_STEP_SHARE = 0.01


def _cross_entropy_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Summed rather than averaged so each example's gradient does not shrink with batch size
    # (the sign / L2 direction is the same either way, but small floats stay representable).
    return F.cross_entropy(logits.float(), y, reduction="sum")


def default_step_size(eps: float, steps: int) -> float:
    """The thesis's rule: 1.5 * eps / steps, so one step can cross the ball from the centre."""
    return 1.5 * eps / steps


def max_eps(norm: str, input_shape: Optional[Sequence[int]] = None) -> float:
    """The largest radius that means anything on [0, 1] pixels: the eps policy of advvit.

    Linf: 1 (the whole pixel range). L2 and L1: the diagonal of the input box for one example
    of ``input_shape`` (C, H, W), sqrt(C * H * W) in L2 and C * H * W in L1; unbounded when the
    shape is not known yet.
    """
    if norm == "linf":
        return 1.0
    if norm in ("l2", "l1"):
        if not input_shape:
            return math.inf
        d = math.prod(int(d) for d in input_shape)
        return math.sqrt(d) if norm == "l2" else float(d)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_eps(eps: float, norm: str = "linf", *, input_shape: Optional[Sequence[int]] = None,
              name: str = "eps") -> float:
    """Check a radius against :func:`max_eps`; config, losses, attacks and eval all call this.

    Args:
        input_shape: one example's (C, H, W), when known (bounds the L2 radius).
        name: what the caller calls the radius, for the message.

    Returns:
        ``eps`` as a float.

    Raises:
        ValueError: eps not a finite number >= 0, or above the norm's maximum.
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (e.g. 4/255 for Linf, 3.0 for L2, "
                         f"75 for L1 on ImageNet), got {eps!r}")
    bound = max_eps(norm, input_shape)
    if eps > bound:
        if norm == "linf":
            raise ValueError(f"{name} {eps:g} is above 1, the whole [0, 1] pixel range, for Linf: "
                             f"did you mean {eps:g}/255?")
        raise ValueError(f"{name} {eps:g} is above {bound:.4g}, the {norm.upper()} diagonal of a "
                         f"{'x'.join(str(d) for d in input_shape)} input in [0, 1]: no image is "
                         "that far from another")
    return float(eps)


def check_attack_args(eps: float, steps: int = 1, norm: str = "linf",
                      step_size: Optional[float] = None, model_mode: str = "eval",
                      mode_name: str = "model_mode") -> float:
    """Check an attack's settings before any work; the losses call it when they are built.

    Args:
        mode_name: what the caller calls ``model_mode`` (the losses' ``attack_mode``), for the
            error message.

    Returns:
        ``eps`` as a float.

    Raises:
        ValueError: naming the first bad argument and what it accepts.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    eps = check_eps(eps, norm)
    if step_size is not None and not (isinstance(step_size, (int, float))
                                      and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be > 0 or None for 1.5 * eps / steps, got {step_size!r}")
    if model_mode not in ("eval", "train", "keep"):
        raise ValueError(f"{mode_name} must be 'eval', 'train' or 'keep', got {model_mode!r}")
    return float(eps)


def _check_input(x: torch.Tensor, check_range: bool) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of pixels in [0, 1]")
    if check_range and x.device.type != "xla":
        # One reduction; skipped on XLA, where reading a value back would cut the graph.
        lo, hi = torch.aminmax(x.detach())
        if lo.item() < 0.0 or hi.item() > 1.0:
            raise ValueError(
                f"x must hold pixels in [0, 1] (found [{lo.item():.4g}, {hi.item():.4g}]); "
                "normalize inside the model (advvit.models.NormalizedModel), not in the data")


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: ModelMode = "eval") -> Iterator[nn.Module]:
    """Put ``model`` in eval or train mode ("keep": leave it); restore every submodule's own
    mode on exit, also when the body raises (a submodule may have been in another mode than
    its parent).

    Yields:
        The same model.
    """
    if mode not in ("eval", "train", "keep"):
        raise ValueError(f"mode must be 'eval', 'train' or 'keep', got {mode!r}")
    training = [(m, m.training) for m in model.modules()] if mode != "keep" else []
    try:
        if mode != "keep":
            model.train(mode == "train")
        yield model
    finally:
        for m, was_training in training:
            m.training = was_training


@contextlib.contextmanager
def frozen_model(model: nn.Module, mode: ModelMode = "eval") -> Iterator[nn.Module]:
    """Freeze parameters and set train/eval mode for an attack; restore both on exit.

    Args:
        model: the model to attack.
        mode: "eval" (BatchNorm statistics do not move, dropout off), "train", or "keep".

    Yields:
        The same model.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    # A train-mode attack (needed on XLA, whose eval-mode BatchNorm has no backward) must not
    # move the running statistics either: keep a copy and put it back.
    saved_stats = []
    if mode == "train":
        saved_stats = [(b, b.detach().clone()) for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with model_mode(model, mode):
            yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)
        with torch.no_grad():
            for buffer, value in saved_stats:
                buffer.copy_(value)


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str,
            x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project a perturbation onto the eps-ball of the given norm (per example).

    With ``x``, the result also keeps ``x + delta`` in [0, 1]. For Linf (a box in a box) and L1
    (:func:`project_l1`) that is the exact Euclidean projection onto the intersection; for L2
    it is the ball's projection clipped to the box, a point of the intersection.
    """
    if norm == "l1":
        return project_l1(delta, eps, x)
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / _per_example_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
        delta = delta * scale
    return delta if x is None else (x + delta).clamp(0.0, 1.0) - x


def project_l1(delta: torch.Tensor, eps: float, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact Euclidean projection of ``delta`` onto {d : ||d||_1 <= eps, x + d in [0, 1]}.

    Per example, the projection is ``sign(delta) * clip(|delta| - lam, 0, cap)`` with ``cap``
    the room each coordinate has towards its sign inside the box (unbounded without ``x``) and
    the smallest ``lam >= 0`` that brings the L1 norm to ``eps``. The norm is piecewise linear
    in ``lam`` with its kinks at ``|delta|`` and ``|delta| - cap``: the kinks are sorted, the
    norm evaluated at each, and ``lam`` solved on the segment that crosses ``eps`` (the
    algorithm of AutoAttack's ``L1_projection``, Croce & Hein 2021), in float64 so that the
    float32 result keeps within the ball up to rounding of ``x + delta``.
    """
    if eps == 0:
        return torch.zeros_like(delta)
    shape, dtype = delta.shape, delta.dtype
    z = delta.detach().flatten(1).double()
    a = z.abs()
    if x is None:
        cap = torch.full_like(a, math.inf)
    else:
        xf = x.detach().flatten(1).double()
        cap = torch.where(z > 0, 1.0 - xf, xf)
    over = torch.minimum(a, cap).sum(1, keepdim=True) > eps
    # The norm at lam = 0 is above eps where lam is looked for, so lam > 0 there: kinks below
    # 0 (every unbounded one among them) can sit at 0 without changing the norm.
    kinks = torch.cat([a - cap, a], 1).clamp_min(0.0)
    # Walking lam downwards, a coordinate starts to move at |delta| and stops at the box.
    entering = torch.cat([-torch.ones_like(a), torch.ones_like(a)], 1)
    kinks, order = kinks.sort(1, descending=True)
    moving = entering.gather(1, order).cumsum(1)
    norm_at = torch.cat([torch.zeros_like(kinks[:, :1]),
                         (moving[:, :-1] * (kinks[:, :-1] - kinks[:, 1:])).cumsum(1)], 1)
    # Where the norm is over eps: 0 < eps at the first kink, the norm at lam = 0 > eps at the
    # last, and the segment that crosses eps has a coordinate moving. Elsewhere lam is 0;
    # computing every row alike keeps the projection free of data-dependent shapes.
    k = (norm_at < eps).sum(1, keepdim=True) - 1
    lam = kinks.gather(1, k) - (eps - norm_at.gather(1, k)) / moving.gather(1, k).clamp_min(1)
    lam = torch.where(over, lam, torch.zeros_like(lam))
    out = torch.minimum((a - lam).clamp_min(0.0), cap)
    return (z.sign() * out).to(dtype).view(shape)


def _random_init(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    d = x[0].numel()
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    elif norm == "l1":
        # APGD-L1's start: a standard normal point projected onto the ball and the box. The
        # projection of a point that far out keeps its largest coordinates only: a sparse start,
        # as the L1 optimum inside the box is; a start uniform in the ball spreads eps over every
        # coordinate, and steps of 1.5 * eps in all cannot gather it again.
        return project_l1(torch.randn_like(x), eps, x)
    else:
        # Uniform in the L2 ball: a normal direction and a radius with density ~ r^(d-1).
        direction = torch.randn_like(x)
        direction = direction / _per_example_norm(direction).clamp_min(_TINY)
        radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).pow(1.0 / d)
        delta = direction * (eps * radius).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0) - x


def _ascent_step(grad: torch.Tensor, norm: str, x_adv: torch.Tensor,
                 alpha: float) -> torch.Tensor:
    if norm == "linf":
        return alpha * grad.sign()
    if norm == "l1":
        return _l1_step(grad, x_adv, alpha)
    return alpha * (grad / _per_example_norm(grad).clamp_min(_TINY))


def _l1_step(grad: torch.Tensor, x_adv: torch.Tensor, alpha: float) -> torch.Tensor:
    """SLIDE's sparse step of L1 length ``alpha``, filled up inside the box.

    The L1 steepest-ascent step puts all of ``alpha`` on the coordinate of largest |grad|;
    SLIDE spreads it over the top 1% (at most ``alpha / k`` each for k = 1% of the
    coordinates), so a fixed number of steps does not spend the budget one pixel at a time.
    Inside the box a coordinate takes no more than its room towards the gradient's sign, and
    what it cannot take goes to the next largest |grad| (APGD-L1's observation, Croce & Hein
    2021: a step onto coordinates at the box edge is clipped away). The step is then the
    steepest ascent among steps of L1 length up to ``alpha`` that stay in the box and give no
    coordinate more than ``alpha / k`` (a fractional knapsack: greedy in |grad| is optimal).
    """
    g = grad.flatten(1)
    xa = x_adv.flatten(1)
    room = torch.where(g > 0, 1.0 - xa, xa) * (g != 0)
    share = alpha / max(1, math.ceil(_L1_STEP_SHARE * g.shape[1]))
    order = g.abs().argsort(1, descending=True)
    take = room.gather(1, order).clamp(max=share)
    before = take.cumsum(1) - take
    take = torch.minimum(take, (alpha - before).clamp_min(0.0))
    step = torch.zeros_like(g).scatter_(1, order, take)
    return (g.sign() * step).view_as(grad)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: Optional[float] = None,
    steps: int = 1,
    norm: str = "linf",
    random_init: bool = True,
    targeted: bool = False,
    loss_fn: Optional[LossFn] = None,
    on_step: Optional[Callable[[], None]] = None,
    model_mode: ModelMode = "eval",
    x_init: Optional[torch.Tensor] = None,
    check_range: bool = True,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) in the Linf, L2 or L1 ball.

    The L1 step is SLIDE's sparse step (Tramer & Boneh 2019), filled up inside the box
    (:func:`_l1_step`), followed by the exact projection onto the L1 ball intersected with the
    box (:func:`project_l1`); the random start is APGD-L1's, a normal point projected onto
    both. SLIDE rather than APGD-L1's step: APGD-L1 adapts its sparsity and step size from the
    loss history of a long run, which a fixed-step PGD (one step for FGSM, a few in training)
    does not have. ``advvit.eval`` runs AutoAttack's own APGD-L1 for an L1 evaluation.

    Args:
        model: maps pixels in [0, 1] to logits.
        x: clean inputs in [0, 1], NCHW.
        y: labels (class indices or soft targets) passed to ``loss_fn``.
        eps: radius of the ball; 0 returns ``x`` unchanged without running the model.
        step_size: step length; None takes ``1.5 * eps / steps``.
        steps: number of gradient steps (1 is FGSM, with ``random_init`` FGSM-RS).
        norm: "linf", "l2" or "l1".
        random_init: start from a uniform point in the ball instead of ``x``.
        targeted: minimise the loss towards ``y`` instead of maximising it.
        loss_fn: ``loss_fn(logits, y) -> scalar`` to ascend; default summed cross-entropy.
        on_step: called once after every iteration (the XLA step barrier, for example).
        model_mode: "eval" (default), "train" or "keep" the model's current mode.
        x_init: explicit starting point (overrides ``random_init``); projected into the ball.
        check_range: verify that ``x`` lies in [0, 1] (one device-to-host read).

    Returns:
        Detached adversarial inputs within the eps-ball around ``x`` and within [0, 1].

    Raises:
        ValueError: on a negative eps, steps < 1, an unknown norm or x outside [0, 1].
    """
    check_attack_args(eps, steps, norm, step_size, model_mode)
    _check_input(x, check_range)
    check_eps(eps, norm, input_shape=tuple(x.shape[1:]))
    x = x.detach()
    if eps == 0:
        return x.clone()
    alpha = default_step_size(eps, steps) if step_size is None else step_size
    loss_fn = loss_fn or _cross_entropy_sum

    if x_init is not None:
        delta = project(x_init.detach() - x, eps, norm, x)
    elif random_init:
        delta = _random_init(x, eps, norm)
    else:
        delta = torch.zeros_like(x)

    with frozen_model(model, model_mode), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            if targeted:
                grad = -grad
            with torch.no_grad():
                delta = delta + _ascent_step(grad, norm, x + delta, alpha)
                delta = project(delta, eps, norm, x)
            if on_step is not None:
                on_step()
    return (x + delta).detach()


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: Optional[float] = None,
    norm: str = "linf",
    random_init: bool = True,
    targeted: bool = False,
    loss_fn: Optional[LossFn] = None,
    on_step: Optional[Callable[[], None]] = None,
    model_mode: ModelMode = "eval",
    check_range: bool = True,
) -> torch.Tensor:
    """One step of :func:`pgd`: FGSM, or FGSM-RS (Wong et al.) with ``random_init``.

    From the clean point the default 1.5 * eps step is projected back to the ball, so the result
    equals classic FGSM's ``x + eps * sign(grad)`` (clipped to [0, 1]); in L1 it spends eps on
    the pixels of largest |grad| that have room in the box, at most 1% of eps on each where
    the input has more than 100.
    """
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=1, norm=norm,
               random_init=random_init, targeted=targeted, loss_fn=loss_fn, on_step=on_step,
               model_mode=model_mode, check_range=check_range)
