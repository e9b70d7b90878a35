"""Sanity checks on a robustness evaluation, one small function each.

Each check returns ``None`` when all is well, or a :class:`Flag`: a short code, one plain line
saying what the finding means for the numbers, and the measured detail. The evaluation CLI prints
the flags and marks the numbers they concern in its JSON report. Most flags point at the usual
ways an evaluation overstates robustness (Carlini et al., "On Evaluating Adversarial Robustness";
Croce & Hein, AutoAttack's ``flags_doc.md``): masked or broken gradients, a randomized model,
probabilities where logits belong, and attacks that disagree with each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .attacks import model_mode

__all__ = [
    "Flag",
    "ALL_ROBUST",
    "GRADIENT_MASKING",
    "input_margin_gradient",
    "missing_input_gradient",
    "check_zero_gradients",
    "check_nonfinite_gradients",
    "check_randomized",
    "check_softmax_output",
    "check_robust_rises_with_eps",
    "check_black_box_beats_white_box",
    "check_robust_above_clean",
    "check_autoattack_warnings",
    "check_failed_attacks",
    "run_model_checks",
]

ALL_ROBUST = "*"
"""``Flag.affects`` value meaning: every robust-accuracy number of the report."""

GRADIENT_MASKING = frozenset({
    "zero_gradients", "nonfinite_gradients", "attack_failed", "black_box_beats_white_box",
    "aa_zero_gradients", "aa_square_beats_white_box",
})
"""Flag codes meaning the gradients are masked or missing: gradient attacks then overstate
robustness, and a report leads with that (robust accuracy marked untrustworthy)."""


@dataclass(frozen=True)
class Flag:
    """A warning about an evaluation.

    Attributes:
        code: a stable short name (e.g. "zero_gradients"), used to mark numbers in reports.
        message: one plain line: what the finding means for the user's numbers.
        detail: what was measured (counts, values), for the curious.
        affects: report entries the flag casts doubt on: attack names, "clean", eps values as
            strings, or :data:`ALL_ROBUST`.
    """

    code: str
    message: str
    detail: str = ""
    affects: tuple[str, ...] = field(default=(ALL_ROBUST,))

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" + (f" ({self.detail})" if self.detail else "")


def _eval_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with model_mode(model, "eval"), torch.no_grad():
        return model(x)


def input_margin_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the logit margin (true class minus best other class) w.r.t. the input.

    The margin, not cross-entropy, is differentiated: cross-entropy's gradient underflows to
    exactly zero on confidently classified examples of a healthy model, the margin's does not,
    so a zero here means the logits really do not respond to the input.

    Args:
        model: classifier returning logits; evaluated in eval mode, mode restored afterwards.
        x: inputs (N, ...) in [0, 1].
        y: labels (N,).

    Returns:
        The gradient, same shape as ``x``; parameter gradients are left untouched.
    """
    x = x.detach().clone().requires_grad_(True)
    with model_mode(model, "eval"), torch.enable_grad():
        logits = model(x)
        if not logits.requires_grad:  # input and weights both cut from the graph
            return torch.zeros_like(x)
        true = logits.gather(1, y.view(-1, 1)).squeeze(1)
        other = logits.clone()
        other.scatter_(1, y.view(-1, 1), float("-inf"))
        margin = true - other.max(1).values
        (grad,) = torch.autograd.grad(margin.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad.detach()


def missing_input_gradient(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why no gradient of the model's output reaches its input, or None when one does.

    A forward that detaches its input (``x.detach()``, a numpy round trip, ``torch.no_grad``)
    leaves gradient attacks nothing to follow: autograd then raises inside them.

    Args:
        model: classifier; evaluated in eval mode, every submodule's mode restored afterwards.
        x: a batch of inputs in [0, 1].
    """
    x = x.detach().clone().requires_grad_(True)
    with model_mode(model, "eval"), torch.enable_grad():
        out = model(x)
        connected = out.requires_grad and torch.autograd.grad(
            out.float().sum(), x, allow_unused=True)[0] is not None
    if connected:
        return None
    return ("the model's output has no gradient with respect to its input (its forward cuts "
            "the input from the autograd graph, e.g. with x.detach()): gradient attacks cannot "
            "run on it")


def check_zero_gradients(grad: torch.Tensor, *, min_fraction: float = 0.0) -> Flag | None:
    """Flag examples whose input gradient is exactly zero (from :func:`input_margin_gradient`).

    Args:
        grad: input gradients (N, ...).
        min_fraction: flag only when more than this fraction of examples have zero gradient.
    """
    zero = grad.flatten(1).abs().sum(1) == 0
    k, n = int(zero.sum()), grad.shape[0]
    if n == 0 or k / n <= min_fraction:
        return None
    return Flag("zero_gradients",
                "the model's gradient is zero on some inputs: gradient attacks cannot move them, "
                "so robust accuracy from APGD/PGD/FAB is likely overstated (gradient masking)",
                f"{k} of {n} examples have an all-zero input gradient")


def check_nonfinite_gradients(grad: torch.Tensor) -> Flag | None:
    """Flag NaN or infinite input gradients (from :func:`input_margin_gradient`)."""
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    k, n = int(bad.sum()), grad.shape[0]
    if k == 0:
        return None
    return Flag("nonfinite_gradients",
                "the model's gradient is NaN or infinite on some inputs: gradient attacks break "
                "down there, so robust accuracy is likely overstated",
                f"{k} of {n} examples have a NaN/inf input gradient")


def check_randomized(model: nn.Module, x: torch.Tensor, *, n: int = 3,
                     atol: float = 1e-5) -> Flag | None:
    """Flag a model whose eval-mode output changes between identical calls.

    Args:
        model: the classifier (evaluated in eval mode, mode restored afterwards).
        x: a batch of inputs.
        n: how many forward passes to compare.
        atol: largest absolute difference in logits still taken as equal.
    """
    outputs = [_eval_forward(model, x) for _ in range(n)]
    diff = max(float((o - outputs[0]).abs().max()) for o in outputs[1:])
    if diff <= atol:
        return None
    return Flag("randomized",
                "the model gives different outputs for the same input: fixed-seed attacks "
                "underestimate a randomized defense; evaluate it with EOT: --attack "
                "autoattack-rand (AutoAttack's 'rand' version), and report that",
                f"max logit difference {diff:.3g} over {n} identical forward passes")


def check_softmax_output(model: nn.Module, x: torch.Tensor, *, atol: float = 1e-4
                         ) -> Flag | None:
    """Flag a model that returns probabilities (softmax) instead of logits."""
    out = _eval_forward(model, x)
    if out.numel() == 0:
        return None
    in_unit = bool(out.min() >= -atol) and bool(out.max() <= 1 + atol)
    sums_to_one = bool(((out.sum(1) - 1).abs() <= atol).all())
    if not (in_unit and sums_to_one):
        return None
    return Flag("softmax_output",
                "the model returns probabilities, not logits: the cross-entropy and DLR losses "
                "of the attacks saturate, so robust accuracy is likely overstated; return "
                "the logits",
                "every output row lies in [0, 1] and sums to 1")


def check_robust_rises_with_eps(points: Iterable[tuple[float, float]], *, tol: float = 0.0
                                ) -> Flag | None:
    """Flag robust accuracy that is higher at a larger eps.

    Any adversarial example at a small eps also lies in the larger ball, so a correct attack
    cannot do worse there; a rise means the attack failed to converge.

    Args:
        points: (eps, robust accuracy) pairs, any order.
        tol: rises up to this size are ignored.
    """
    ordered = sorted(points)
    rises = [(a, b) for (a, acc_a), (b, acc_b) in zip(ordered, ordered[1:])
             if acc_b > acc_a + tol]
    if not rises:
        return None
    return Flag("robust_rises_with_eps",
                "robust accuracy goes up as eps grows: the attack is not converging, so the "
                "numbers at the larger eps are overstated; use more iterations or restarts",
                "; ".join(f"eps {b:.4g} above eps {a:.4g}" for a, b in rises),
                tuple(f"{b:.6g}" for _, b in rises))


def check_black_box_beats_white_box(outcomes: Sequence[tuple[str, float]],
                                    black_box: Iterable[str] = ("square",), *,
                                    tol: float = 0.002) -> Flag | None:
    """Flag a black-box attack that breaks examples the gradient attacks before it could not.

    Args:
        outcomes: (attack, robust accuracy after it) in the order an ensemble ran them
            (cumulative, as AutoAttack reports them).
        black_box: names of the attacks that use no gradients.
        tol: drops up to this fraction are ignored (AutoAttack uses 0.2%).
    """
    black = set(black_box)
    seen_white, previous, found = False, None, []
    for name, acc in outcomes:
        if name in black and seen_white and previous is not None and previous - acc > tol:
            found.append((name, previous - acc))
        seen_white = seen_white or name not in black
        previous = acc
    if not found:
        return None
    return Flag("black_box_beats_white_box",
                "an attack without gradients broke examples the gradient attacks could not: "
                "the gradients are likely masked, so the gradient-attack numbers are "
                "overstated",
                "; ".join(f"{name} lowered robust accuracy by {drop:.2%}" for name, drop in found),
                (ALL_ROBUST,))


def check_robust_above_clean(clean_accuracy: float, robust_accuracy: float, *,
                             attack: str = ALL_ROBUST) -> Flag | None:
    """Flag robust accuracy above clean accuracy (impossible for a correct evaluation)."""
    if not robust_accuracy > clean_accuracy:
        return None
    return Flag("robust_above_clean",
                "robust accuracy is above clean accuracy, which a correct evaluation never "
                "gives: the model or the attack is broken (randomness, wrong labels, eval mode)",
                f"robust {robust_accuracy:.2%} > clean {clean_accuracy:.2%}", (attack,))


def check_failed_attacks(failed: Sequence[tuple[str, str]]) -> Flag | None:
    """Flag attacks that could not run for lack of a gradient.

    Args:
        failed: (attack, reason) for each attack the runner recorded as failed.
    """
    if not failed:
        return None
    return Flag("attack_failed",
                "gradient attacks could not run (the model gives no input gradient): the "
                "examples they could not attack count as not broken, so robust accuracy is "
                "overstated (gradient masking)",
                "; ".join(f"{', '.join(names)}: {reason}"
                          for reason, names in _by_reason(failed).items()), (ALL_ROBUST,))


def _by_reason(failed: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, reason in failed:
        grouped.setdefault(reason, []).append(name)
    return grouped


# AutoAttack's own flags (its checks.py), keyed by a phrase of their message.
_AA_FLAGS = (
    ("randomized defense", "aa_randomized",
     "AutoAttack found the model randomized: its deterministic attacks underestimate it; "
     "use --attack autoattack-rand"),
    ("probability distribution", "aa_softmax_output",
     "AutoAttack found probabilities, not logits, at the output: robustness is overstated"),
    ("zero gradient", "aa_zero_gradients",
     "AutoAttack's APGD met zero gradients: gradient attacks cannot move those inputs"),
    ("Square Attack has decreased", "aa_square_beats_white_box",
     "AutoAttack found Square beating the gradient attacks: gradients are likely masked"),
    ("dynamic defense", "aa_dynamic",
     "AutoAttack found gradient computations inside the forward pass (a dynamic defense): "
     "AutoAttack alone may not be enough"),
    ("target classes", "aa_n_classes",
     "AutoAttack's targeted attacks ask for more target classes than the model has"),
    ("DLR loss", "aa_n_classes",
     "the model has too few classes for AutoAttack's DLR losses"),
)


def check_autoattack_warnings(messages: Iterable[str]) -> list[Flag]:
    """Turn AutoAttack's own warning messages into flags (unknown ones are kept verbatim)."""
    flags: list[Flag] = []
    for message in messages:
        for phrase, code, line in _AA_FLAGS:
            if phrase.lower() in message.lower():
                flags.append(Flag(code, line, message.strip()))
                break
        else:
            flags.append(Flag("aa_other", "AutoAttack raised a warning", message.strip()))
    return flags


def run_model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Flag]:
    """Run the checks that need only the model and one batch: gradients, randomness, softmax.

    Args:
        model: the classifier, on the device of ``x``.
        x: a batch of inputs in [0, 1].
        y: its labels.

    Returns:
        The flags raised, possibly none.
    """
    grad = input_margin_gradient(model, x, y)
    found = [check_zero_gradients(grad), check_nonfinite_gradients(grad),
             check_randomized(model, x), check_softmax_output(model, x)]
    return [f for f in found if f is not None]
