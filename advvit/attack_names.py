"""What an attack name means: the one table of the names ``advvit.eval``, the analyses and the
findings accept, with each one's kind, AutoAttack version and defaults.

Where a default differs between commands, the table names it per command: an AutoAttack
attack run alone by ``advvit.eval`` without ``--restarts`` keeps AutoAttack's own default for
its custom version (5 restarts x 100 iterations for APGD: the thesis's setting), except Square,
which keeps its single restart; the analyses that craft adversarial examples (``transfer``)
restart once unless told otherwise. Every tuple of names (AutoAttack's attacks, the ensembles,
the transfer attacks, the black-box ones) is read from the table.

This module imports the standard library and :mod:`advvit.io` only.
"""
from __future__ import annotations

from dataclasses import dataclass

from .io import OptionError

__all__ = [
    "AttackName", "ATTACKS", "ENSEMBLES", "AUTOATTACK_ATTACKS", "TORCH_ATTACKS",
    "ATTACK_CHOICES", "TRANSFER_ATTACKS", "BLACK_BOX_ATTACKS", "ANALYZE_RESTARTS",
    "AttackSpec", "attack_spec", "parse_attack",
]


@dataclass(frozen=True)
class AttackName:
    """One attack name.

    Attributes:
        name: as the commands take it.
        kind: "autoattack" (the AutoAttack code, via the adapter) or "pgd" / "fgsm"
            (advvit.attacks).
        version: AutoAttack's version ("standard", "plus", "rand") for an ensemble, "custom"
            for one of its attacks; None for pgd / fgsm.
        black_box: it uses no gradients (beating the others hints at masked gradients).
        steps_are: what ``--steps`` counts: "iterations", or "queries" (Square alone).
        eval_restarts: ``advvit.eval``'s restarts when it runs alone without ``--restarts``;
            None: AutoAttack's own custom-version default (5 for APGD).
        analyze_steps: the steps an analysis crafts with by default; None: no analysis crafts
            with it.
    """

    name: str
    kind: str
    version: str | None
    black_box: bool = False
    steps_are: str = "iterations"
    eval_restarts: int | None = None
    analyze_steps: int | None = None


ATTACKS: dict[str, AttackName] = {a.name: a for a in (
    AttackName("pgd", "pgd", None, analyze_steps=10),
    AttackName("fgsm", "fgsm", None, analyze_steps=1),
    AttackName("autoattack", "autoattack", "standard"),
    AttackName("autoattack-standard", "autoattack", "standard"),
    AttackName("autoattack-plus", "autoattack", "plus"),
    AttackName("autoattack-rand", "autoattack", "rand"),
    AttackName("apgd-ce", "autoattack", "custom", analyze_steps=100),
    AttackName("apgd-dlr", "autoattack", "custom"),
    AttackName("apgd-t", "autoattack", "custom"),
    AttackName("fab", "autoattack", "custom"),
    AttackName("fab-t", "autoattack", "custom"),
    AttackName("square", "autoattack", "custom", black_box=True, steps_are="queries",
               eval_restarts=1),
)}
"""Every attack name, in the table's order."""

ENSEMBLES = {a.name: a.version for a in ATTACKS.values()
             if a.kind == "autoattack" and a.version != "custom"}
"""AutoAttack as published: name -> version."""
AUTOATTACK_ATTACKS = tuple(a.name for a in ATTACKS.values() if a.version == "custom")
"""The attack names both AutoAttack packages understand (alone, or in a comma list)."""
TORCH_ATTACKS = tuple(a.name for a in ATTACKS.values() if a.kind != "autoattack")
ATTACK_CHOICES = (*ENSEMBLES, *AUTOATTACK_ATTACKS, *TORCH_ATTACKS)
"""``advvit.eval --attack``'s names, in the order its messages list them."""
TRANSFER_ATTACKS = tuple(a.name for a in ATTACKS.values() if a.analyze_steps is not None)
"""The attacks the transfer analysis crafts with."""
BLACK_BOX_ATTACKS = frozenset(a.name for a in ATTACKS.values() if a.black_box)
ANALYZE_RESTARTS = 1
"""The analyses' restarts per example (``advvit.analyze transfer --restarts``'s default)."""


@dataclass(frozen=True)
class AttackSpec:
    """One attack as a command runs it.

    Attributes:
        name: the attack's text.
        kind: "autoattack" (the AutoAttack code, via the adapter) or "pgd" / "fgsm" (advvit.attacks).
        version: AutoAttack version ("standard", "plus", "rand", "custom"); None for pgd/fgsm.
        attacks: the AutoAttack attacks run, in order (custom version), or (kind,).
        steps: iterations (APGD/FAB/PGD) or queries (Square); None for the default.
        restarts: restarts; None for the default.
        step_size: PGD/FGSM step size; None for advvit.attacks' default.
    """

    name: str
    kind: str
    version: str | None
    attacks: tuple[str, ...]
    steps: int | None = None
    restarts: int | None = None
    step_size: float | None = None


def attack_spec(name: str, *, steps: int | None = None, restarts: int | None = None,
                step_size: float | None = None) -> AttackSpec:
    """The spec of one name of :data:`ATTACKS` with its knobs, unchecked (the library's callers
    check their own arguments; :func:`parse_attack` checks a command line's)."""
    entry = ATTACKS[name]
    if entry.kind != "autoattack":
        return AttackSpec(name, entry.kind, None, (name,), steps, restarts, step_size)
    if entry.version != "custom":
        return AttackSpec(name, "autoattack", entry.version, ())
    return AttackSpec(name, "autoattack", "custom", (name,), steps, restarts)


def parse_attack(text: str, *, steps: int | None = None, restarts: int | None = None,
                 step_size: float | None = None) -> AttackSpec:
    """Turn ``--attack`` and its knobs into an :class:`AttackSpec`.

    ``autoattack`` / ``autoattack-plus`` run AutoAttack as published, ``autoattack-rand`` its
    version for randomized models (APGD-CE and APGD-DLR with 20-sample EOT; knobs refused);
    a comma list of AutoAttack names (``apgd-ce,apgd-t``) runs a custom ensemble; one name alone
    runs that attack (at its ``eval_restarts``: ``apgd-ce`` takes the thesis's 5 restarts x 100
    iterations, ``--restarts 1`` is AutoAttack's standard setting); ``pgd`` / ``fgsm`` run
    advvit.attacks.

    Raises:
        OptionError: unknown names, or knobs that do not apply.
    """
    text = text.strip().lower()
    for knob, value in (("--steps", steps), ("--restarts", restarts)):
        if value is not None and value < 1:
            raise OptionError(f"{knob} must be >= 1, got {value}")
    if step_size is not None and not step_size > 0:
        raise OptionError(f"--step-size must be > 0, got {step_size}")
    if text in ENSEMBLES:
        if any(v is not None for v in (steps, restarts, step_size)):
            raise OptionError(f"--attack {text} runs AutoAttack as published: drop --steps/"
                              "--restarts/--step-size, or name the attacks (e.g. --attack "
                              "apgd-ce,apgd-t)")
        return attack_spec(text)
    if text in TORCH_ATTACKS:
        if text == "fgsm" and (steps not in (None, 1) or restarts not in (None, 1)):
            raise OptionError("--attack fgsm is one step without restarts: use --attack pgd for "
                              "--steps/--restarts")
        return attack_spec(text, steps=steps, restarts=restarts, step_size=step_size)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in AUTOATTACK_ATTACKS]
    if not names or unknown:
        raise OptionError(f"--attack {text!r} is unknown: use one of {', '.join(ATTACK_CHOICES)}"
                          f", or a comma list of {', '.join(AUTOATTACK_ATTACKS)}")
    if len(set(names)) != len(names):
        raise OptionError(f"--attack {text!r} names an attack twice")
    if step_size is not None:
        raise OptionError("--step-size applies to pgd/fgsm only: the AutoAttack attacks choose "
                          "their own step sizes")
    return AttackSpec(text, "autoattack", "custom", names, steps, restarts)
