"""Pluggable training losses: clean, adversarial (FGSM-RS / PGD-k) and TRADES.

Every loss is an ``nn.Module`` with ``forward(model, x, y) -> LossOutput``. The trainer sets
``loss.eps`` before each step (the eps warm-up) and may pass ``attack_model``: the module the
attack should call (under DDP, the unwrapped module, so attack passes never touch the gradient
reducer). Imports torch only.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import check_attack_args, frozen_model, pgd

__all__ = ["LossOutput", "CleanLoss", "AdversarialLoss", "TRADESLoss", "create_loss", "LOSSES",
           "DEFAULT_STEPS", "default_steps"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The one default attack-step count per loss name; create_loss and the training config read it.
# FGSM-RS is one step by definition. PGD training means the multi-step attack of Madry et al.,
# 10 steps as in Rice et al. and the trainer's PGD-10 evaluation. TRADES: the thesis fine-tunes
# CIFAR-10 with PGD-10 as its inner attack.
DEFAULT_STEPS: Dict[str, int] = {"fgsm": 1, "adversarial": 1, "pgd": 10, "trades": 10}


def default_steps(name: str, steps: Optional[int] = None) -> int:
    """``steps`` when given, else the loss's default attack-step count (:data:`DEFAULT_STEPS`).

    Raises:
        ValueError: a loss without an attack ("clean") or an unknown name.
    """
    key = name.lower()
    if key not in DEFAULT_STEPS:
        raise ValueError(f"loss {name!r} has no attack steps: choose one of {sorted(DEFAULT_STEPS)}")
    return DEFAULT_STEPS[key] if steps is None else steps


class LossOutput(NamedTuple):
    """What every loss returns: ``loss, clean_logits, adv_logits = out``.

    Attributes:
        loss: the scalar to back-propagate.
        clean_logits: detached logits on the clean inputs, or None when not computed.
        adv_logits: detached logits on the adversarial inputs, or None for a clean loss.
    """

    loss: torch.Tensor
    clean_logits: Optional[torch.Tensor]
    adv_logits: Optional[torch.Tensor]


def _default_criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # F.cross_entropy takes class indices or soft targets (MixUp / CutMix) alike.
    return F.cross_entropy(logits, y)


class CleanLoss(nn.Module):
    """Standard training: ``criterion(model(x), y)``.

    Args:
        criterion: ``criterion(logits, y) -> scalar``; default cross-entropy. Any timm loss works
            (``LabelSmoothingCrossEntropy``, ``SoftTargetCrossEntropy``).
    """

    def __init__(self, criterion: Optional[Criterion] = None) -> None:
        super().__init__()
        self.criterion = criterion or _default_criterion
        self.eps = 0.0

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                attack_model: Optional[nn.Module] = None) -> LossOutput:
        logits = model(x)
        return LossOutput(self.criterion(logits, y), logits.detach(), None)


class AdversarialLoss(nn.Module):
    """Adversarial training (Madry et al.): ``criterion(model(pgd(x)), y)``.

    One step with a random start is FGSM-RS, the thesis's training attack.

    Args:
        eps: radius of the perturbation ball (writable between steps; 0 skips the attack).
        steps: attack iterations.
        step_size: None for ``1.5 * eps / steps`` (recomputed as eps changes).
        norm: "linf", "l2" or "l1".
        random_init: random start inside the ball.
        criterion: training criterion on the adversarial logits; default cross-entropy.
        attack_loss: what the attack ascends, ``fn(logits, y)``; default summed cross-entropy.
        clean_logits: also report clean logits, at the cost of one extra no-grad eval forward.
        attack_mode: train/eval mode during the attack ("eval" keeps BatchNorm statistics still).
        on_step: called after each attack iteration (the XLA step barrier).
    """

    def __init__(self, *, eps: float, steps: int = DEFAULT_STEPS["adversarial"],
                 step_size: Optional[float] = None, norm: str = "linf", random_init: bool = True,
                 criterion: Optional[Criterion] = None,
                 attack_loss: Optional[Criterion] = None, clean_logits: bool = False,
                 attack_mode: str = "eval", on_step: Optional[Callable[[], None]] = None,
                 check_range: bool = True) -> None:
        super().__init__()
        self.eps = check_attack_args(eps, steps, norm, step_size, attack_mode, "attack_mode")
        self.steps = steps
        self.step_size = step_size
        self.norm = norm
        self.random_init = random_init
        self.criterion = criterion or _default_criterion
        self.attack_loss = attack_loss
        self.clean_logits = clean_logits
        self.attack_mode = attack_mode
        self.on_step = on_step
        self.check_range = check_range

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                attack_model: Optional[nn.Module] = None) -> LossOutput:
        if self.eps == 0:
            # The adversarial point is x itself: one forward gives both sets of logits.
            logits = model(x)
            out = logits.detach()
            return LossOutput(self.criterion(logits, y), out, out)
        target = attack_model if attack_model is not None else model
        x_adv = pgd(target, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                    norm=self.norm, random_init=self.random_init, loss_fn=self.attack_loss,
                    on_step=self.on_step, model_mode=self.attack_mode,
                    check_range=self.check_range)
        clean = None
        if self.clean_logits:
            clean = _eval_logits(target, x)
        logits = model(x_adv)
        return LossOutput(self.criterion(logits, y), clean, logits.detach())


def _eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """No-grad logits in eval mode, leaving the model's mode (and BatchNorm statistics) alone."""
    with frozen_model(model, "eval"), torch.no_grad():
        return model(x)


def _kl_batchmean(adv_logits: torch.Tensor, clean_prob: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(adv_logits.float(), dim=1), clean_prob, reduction="batchmean")


class TRADESLoss(nn.Module):
    """TRADES (Zhang et al., 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))``.

    As in the original, the inner attack maximises ``KL(f(x) || f(x'))`` with ``f(x)`` detached
    and taken in eval mode, starting from ``x + 0.001 * N(0, 1)``; the outer loss lets gradients
    flow through both the clean and the adversarial term.

    Args:
        eps: radius of the perturbation ball (writable; 0 or ``beta == 0`` skips the attack).
        beta: weight of the robust KL term.
        steps: inner attack iterations (the thesis fine-tunes with PGD-10).
        step_size: None for ``1.5 * eps / steps``.
        norm: "linf", "l2" or "l1".
        criterion: natural loss on the clean logits; default cross-entropy.
        attack_mode: train/eval mode during the attack.
        on_step: called after each attack iteration (the XLA step barrier).
    """

    def __init__(self, *, eps: float, beta: float = 6.0, steps: int = DEFAULT_STEPS["trades"],
                 step_size: Optional[float] = None, norm: str = "linf",
                 criterion: Optional[Criterion] = None, attack_mode: str = "eval",
                 on_step: Optional[Callable[[], None]] = None, check_range: bool = True) -> None:
        super().__init__()
        self.eps = check_attack_args(eps, steps, norm, step_size, attack_mode, "attack_mode")
        if not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"beta must be a number >= 0, got {beta!r}")
        self.beta = float(beta)
        self.steps = steps
        self.step_size = step_size
        self.norm = norm
        self.criterion = criterion or _default_criterion
        self.attack_mode = attack_mode
        self.on_step = on_step
        self.check_range = check_range

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                attack_model: Optional[nn.Module] = None) -> LossOutput:
        if self.eps == 0 or self.beta == 0:
            logits = model(x)
            out = logits.detach()
            return LossOutput(self.criterion(logits, y), out, out)
        target = attack_model if attack_model is not None else model
        clean_prob = F.softmax(_eval_logits(target, x).float(), dim=1)
        x_start = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
        x_adv = pgd(target, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                    norm=self.norm, loss_fn=lambda logits, _: _kl_batchmean(logits, clean_prob),
                    on_step=self.on_step, model_mode=self.attack_mode, x_init=x_start,
                    check_range=self.check_range)
        clean_logits = model(x)
        adv_logits = model(x_adv)
        robust = _kl_batchmean(adv_logits, F.softmax(clean_logits.float(), dim=1))
        loss = self.criterion(clean_logits, y) + self.beta * robust
        return LossOutput(loss, clean_logits.detach(), adv_logits.detach())


LOSSES: Dict[str, Type[nn.Module]] = {
    "clean": CleanLoss,
    "adversarial": AdversarialLoss,
    "trades": TRADESLoss,
}


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: "clean", "adversarial" (aliases "fgsm", "pgd") or "trades".

    Args:
        name: the registered name.
        **kwargs: the loss class's keyword arguments. ``steps`` missing or None takes the name's
            default (:data:`DEFAULT_STEPS`: fgsm 1, pgd 10, trades 10).

    Raises:
        ValueError: for an unknown name, or "fgsm" with ``steps`` other than 1.
    """
    key = name.lower()
    if key not in LOSSES and key not in DEFAULT_STEPS:
        raise ValueError(f"unknown loss {name!r}: choose one of "
                         f"{sorted([*LOSSES, 'fgsm', 'pgd'])}")
    if key in DEFAULT_STEPS:
        kwargs = {**kwargs, "steps": default_steps(key, kwargs.get("steps"))}
        if key == "fgsm" and kwargs["steps"] != 1:
            raise ValueError(f"loss 'fgsm' takes 1 attack step, got steps={kwargs['steps']!r}: "
                             "use 'pgd' for a multi-step attack")
    return LOSSES["adversarial" if key in ("fgsm", "pgd") else key](**kwargs)
