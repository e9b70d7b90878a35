"""An :class:`advvit.attack_names.AttackSpec` run on examples: the AutoAttack adapter or advvit's
PGD / FGSM suite, through the one runner (:func:`advvit.robustness.run_attacks`).

``advvit.eval`` and the analyses that craft adversarial examples run attacks here, so an attack
name runs the same attacks, seeding and batches wherever it is named.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from .attack_names import ATTACKS, AttackSpec
from .autoattack_adapter import AutoAttackAdapter
from .robustness import EnsembleResult, run_attacks, torch_attack_suite

__all__ = ["AMP_DTYPES", "Autocast", "autoattack_adapter", "run_attack"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``--amp``'s names for the autocast dtypes."""


class Autocast(nn.Module):
    """``model`` under autocast at ``dtype``, its logits returned in fp32 (the attacks' losses
    and AutoAttack's checks read them so)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.model, self.dtype, self.device_type = model, dtype, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def autoattack_adapter(model: nn.Module, spec: AttackSpec, *, eps: float, norm: str,
                       seed: int, device: torch.device, num_classes: int | None,
                       backend: str = "auto") -> AutoAttackAdapter:
    """The adapter running ``spec`` (kind "autoattack")."""
    kwargs: dict[str, Any] = {}
    if spec.version == "custom":
        alone = ATTACKS[spec.attacks[0]] if len(spec.attacks) == 1 else None
        # --steps is Square's query budget when Square runs alone, the iterations of the
        # gradient attacks otherwise (Square then keeps AutoAttack's 5000 queries).
        queries = alone is not None and alone.steps_are == "queries"
        kwargs["n_queries" if queries else "n_iter"] = spec.steps
        restarts = spec.restarts
        if restarts is None and alone is not None:
            restarts = alone.eval_restarts
        kwargs["n_restarts"] = restarts
    return AutoAttackAdapter(model, eps=eps, norm=norm, version=spec.version,
                             attacks=list(spec.attacks) if spec.version == "custom" else None,
                             seed=seed, device=device, num_classes=num_classes,
                             backend=backend, **kwargs)


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
               eps: float, norm: str = "linf", seed: int = 0, batch_size: int = 250,
               device: str | torch.device = "cpu", state_path: str | os.PathLike | None = None,
               keep_adv: bool = False, num_classes: int | None = None,
               backend: str = "auto",
               on_batch: Callable[[str, int, int], None] | None = None,
               amp: str | None = None) -> EnsembleResult:
    """Run one attack at one eps on (x, y), all on this process, through the one runner.

    With ``amp`` the attacks run on the model under autocast and every adversarial example they
    find is re-checked by the fp32 model: it counts as broken only if it fools that one.

    Args:
        model: classifier on ``device`` taking [0, 1] pixels, returning logits.
        x, y: the examples (CPU tensors).
        spec: from :func:`advvit.attack_names.parse_attack` or ``attack_spec``.
        eps, norm, seed, batch_size, device: as the command options.
        state_path: the runner's resumable state file.
        keep_adv: keep the adversarial examples.
        num_classes: the model's classes (lets AutoAttack's targeted attacks fit < 10 classes).
        backend: AutoAttack package: "auto", "pyautoattack" or "autoattack".
        on_batch: the runner's progress hook.
        amp: None (fp32), or a name of :data:`AMP_DTYPES`.
    """
    device = torch.device(device)
    attacked = model if amp is None else Autocast(model, AMP_DTYPES[amp], device.type)
    precision = amp or "fp32"
    if spec.kind == "autoattack":
        adapter = autoattack_adapter(attacked, spec, eps=eps, norm=norm, seed=seed,
                                     device=device, num_classes=num_classes, backend=backend)
        return adapter.run(x, y, batch_size=batch_size, state_path=state_path,
                           keep_adv=keep_adv, on_batch=on_batch, fp32_model=model,
                           precision=precision)
    suite = torch_attack_suite(attacked, spec.kind, eps=eps, norm=norm, steps=spec.steps,
                               restarts=spec.restarts, step_size=spec.step_size, seed=seed)
    return run_attacks(model, x, y, suite, batch_size=batch_size, device=device,
                       state_path=state_path, keep_adv=keep_adv, on_batch=on_batch,
                       precision=precision)
