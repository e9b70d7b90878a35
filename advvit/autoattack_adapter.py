"""One adapter over the AutoAttack code: pyautoattack or the reference ``autoattack`` package.

The two packages carry the same attacks (APGD-CE, APGD-DLR, APGD-T, FAB, FAB-T, Square) behind
different front classes: pyautoattack takes ``attacks=``/``batch_size=``/``state_path=`` and logs
to the ``auto-attack`` logger; the reference package takes ``attacks_to_run=``/``bs=``/``log_path=``
and prints. :class:`AutoAttackAdapter` hides the difference and adds what an evaluation report
needs and neither front class returns: robust accuracy and time after every attack, the attack
that broke each example, AutoAttack's own warnings, and a resumable state file.

How it runs: each AutoAttack attack is a :class:`advvit.robustness.BatchAttack` that sends one
batch through the package's own ``run_standard_evaluation`` with only that attack enabled, and
:func:`advvit.robustness.run_attacks` (the runner PGD and FGSM use too) runs them as AutoAttack's
ensemble loop does: for each attack, the examples still robust are cut into the same batches
AutoAttack cuts them into. Every attack re-seeds itself at the start of each batch, so the
outcome equals one call of ``run_standard_evaluation`` on the whole set (a test checks it).
Recording progress per batch is what makes a resumed evaluation equal an uninterrupted one:
pyautoattack's own ``state_path`` re-batches an interrupted attack, which changes its random
starts.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import tempfile
import types
import warnings
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from .attack_names import AUTOATTACK_ATTACKS, BLACK_BOX_ATTACKS
from .attacks import check_eps
from .robustness import (AttackOutcome, AttackSuite, BatchAttack, EnsembleResult,
                         StateMismatchError, run_attacks)

__all__ = [
    "AA_ATTACKS",
    "BLACK_BOX_ATTACKS",
    "AttackOutcome",
    "EnsembleResult",
    "AutoAttackAdapter",
    "StateMismatchError",
    "available_backends",
    "backend_version",
    "canonical_norm",
]

AA_ATTACKS = AUTOATTACK_ATTACKS
"""The attack names both AutoAttack packages understand (:mod:`advvit.attack_names`' table)."""

VERSIONS = ("standard", "plus", "rand", "custom")
"""AutoAttack's versions; "rand" (APGD-CE and APGD-DLR with 20-sample EOT) is for randomized
models."""
Backend = Literal["auto", "pyautoattack", "autoattack"]
_AA_LOGGER = "auto-attack"


def canonical_norm(norm: str) -> str:
    """Map "linf"/"l2"/"l1" in any case to AutoAttack's spelling ("Linf", "L2", "L1").

    Raises:
        ValueError: for any other norm.
    """
    table = {"linf": "Linf", "l2": "L2", "l1": "L1"}
    key = str(norm).lower()
    if key not in table:
        raise ValueError(f"norm {norm!r} is not supported: use 'linf', 'l2' or 'l1'")
    return table[key]


def available_backends() -> list[str]:
    """Return the AutoAttack packages importable here, preferred first."""
    found = []
    for name in ("autoattack", "pyautoattack"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "AutoAttack"):
            found.append(name)
    return found


def backend_version(backend: str) -> str:
    """Return the installed version string of an AutoAttack package ("unknown" if unrecorded)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version(backend)
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover - Python < 3.8 only
        pass
    module = importlib.import_module(backend)
    return str(getattr(module, "__version__", "unknown"))


def _resolve_backend(backend: Backend) -> str:
    found = available_backends()
    if backend == "auto":
        # The reference package is what published AutoAttack numbers were computed with: prefer
        # it where a user installed it; pyautoattack (a declared dependency) otherwise.
        if not found:
            raise ImportError("no AutoAttack package found: pip install pyautoattack "
                              "(or the reference package from github.com/fra31/auto-attack)")
        return found[0]
    if backend not in ("pyautoattack", "autoattack"):
        raise ValueError(f"backend {backend!r} is unknown: use 'auto', 'pyautoattack' or "
                         "'autoattack'")
    if backend not in found:
        raise ImportError(f"AutoAttack backend {backend!r} is not installed")
    return backend


class _WarningCollector(logging.Handler):
    """Collects warnings from the ``auto-attack`` logger (pyautoattack's checks)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102 - logging API
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_autoattack_warnings() -> Iterator[list[str]]:
    """Collect what AutoAttack's checks raise while the block runs.

    pyautoattack logs its flags (randomized model, softmax output, zero gradients, Square beating
    the white-box attacks, too many target classes) as warnings on the ``auto-attack`` logger; the
    reference package, given no logger, uses ``warnings.warn``. Both end up in the yielded list.

    Yields:
        A list that fills with the warning messages, in order, without duplicates once the
        block ends.
    """
    logger = logging.getLogger(_AA_LOGGER)
    handler = _WarningCollector()
    logger.addHandler(handler)
    messages: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
        raw = handler.messages + [str(w.message) for w in caught]
        for message in raw:
            if message not in messages:
                messages.append(message)


_MODEL_CHECKS = ("check_randomized", "check_range_output", "check_dynamic", "check_n_classes")


@contextlib.contextmanager
def _model_checks_skipped(skip: bool):
    """pyautoattack runs its model checks (several forwards, one under ``sys.settrace``) at
    every ``run_standard_evaluation`` call; the adapter calls it once per batch and attack, so
    after the first call the checks would only repeat themselves at a measured 2-4% of an
    APGD-CE evaluation. Their results do not feed the attacks."""
    if not skip:
        yield
        return
    aa_module = importlib.import_module("pyautoattack.autoattack")
    real = aa_module.checks
    stub = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if not n.startswith("_")})
    for name in _MODEL_CHECKS:
        setattr(stub, name, lambda *args, **kwargs: None)
    aa_module.checks = stub
    try:
        yield
    finally:
        aa_module.checks = real


class AutoAttackAdapter:
    """Run AutoAttack (standard, plus, rand, or a custom list of its attacks) on a model.

    The model must map [0, 1] NCHW pixels to logits; any normalization belongs inside it. It is
    put in eval mode for the run (AutoAttack's standard version never does) and its mode is
    restored afterwards.

    Args:
        model: the classifier.
        eps: perturbation budget in pixel units (e.g. 4/255).
        norm: "linf", "l2" or "l1" (any case). For L1 the standard version runs what
            AutoAttack's does: APGD-CE with 5 restarts and APGD-T with 5 target classes, both
            stepping down from a larger eps ("use_largereps"), then FAB-T and Square.
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square as published), "plus", "rand"
            (APGD-CE and APGD-DLR averaging 20 gradients per step (EOT), for randomized
            models), or "custom" (then ``attacks`` names the attacks, in order).
        attacks: for ``version="custom"``: names from :data:`AA_ATTACKS`.
        seed: seed every attack re-seeds itself with; never None, so runs repeat.
        device: where AutoAttack moves each batch; the model must already be there.
        n_iter: iterations of APGD / APGD-T / FAB (custom version only; default 100).
        n_restarts: restarts of APGD-CE/DLR, FAB and Square (custom version only; APGD-T and
            FAB-T keep AutoAttack's 1 restart; default 5 for APGD/FAB, 1 for Square).
        n_queries: Square's query budget (custom version only; default 5000).
        num_classes: the model's number of classes; when fewer than 10, APGD-T and FAB-T target
            every other class instead of AutoAttack's fixed 9 (which would fail).
        backend: "auto" (the reference ``autoattack`` package if installed, else pyautoattack),
            "pyautoattack" or "autoattack".

    Raises:
        ValueError: on an unknown version, attack, norm, a bad eps or a non-positive knob.
        ImportError: when the requested AutoAttack package is not installed.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        norm: str = "linf",
        version: str = "standard",
        attacks: Sequence[str] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        n_iter: int | None = None,
        n_restarts: int | None = None,
        n_queries: int | None = None,
        num_classes: int | None = None,
        backend: Backend = "auto",
    ) -> None:
        self.norm = canonical_norm(norm)
        check_eps(eps, self.norm.lower())
        if version not in VERSIONS:
            raise ValueError(f"version {version!r} is unknown: use one of {', '.join(VERSIONS)}")
        if version == "custom":
            if not attacks:
                raise ValueError("version='custom' needs attacks=[...], names from "
                                 + ", ".join(AA_ATTACKS))
            unknown = [a for a in attacks if a not in AA_ATTACKS]
            if unknown:
                raise ValueError(f"unknown AutoAttack attack(s) {unknown}: use names from "
                                 + ", ".join(AA_ATTACKS))
            if len(set(attacks)) != len(attacks):
                raise ValueError(f"attacks {list(attacks)} name an attack twice")
        elif attacks is not None:
            raise ValueError(f"attacks=... is only for version='custom' (version={version!r} "
                             "fixes its own list)")
        elif any(k is not None for k in (n_iter, n_restarts, n_queries)):
            raise ValueError(f"n_iter/n_restarts/n_queries change the attacks: use "
                             f"version='custom' (version={version!r} is run as published)")
        for knob, value in (("n_iter", n_iter), ("n_restarts", n_restarts),
                            ("n_queries", n_queries)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{knob} must be a positive integer, got {value!r}")
        if seed is None:
            raise ValueError("seed must be an integer: AutoAttack seeds None from the clock, "
                             "and the run would not repeat")
        self.model = model
        self.eps = float(eps)
        self.version = version
        self.seed = int(seed)
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.backend = _resolve_backend(backend)
        self.backend_version = backend_version(self.backend)
        self._aa = self._build(attacks, n_iter, n_restarts, n_queries)
        self.attacks: list[str] = list(self._aa.attacks_to_run)
        # AutoAttack's FAB-T sets fab.n_restarts to 1 and leaves it so: every later FAB call
        # (the next batch, the next run) would quietly run one restart. Kept to put it back.
        self._fab_restarts = self._aa.fab.n_restarts
        self._checked = False

    # ----------------------------------------------------------------------------- building
    def _build(self, attacks: Sequence[str] | None, n_iter: int | None,
               n_restarts: int | None, n_queries: int | None):
        module = importlib.import_module(self.backend)
        if self.backend == "pyautoattack":
            aa = module.AutoAttack(self.model, attacks=list(attacks) if attacks else None,
                                   device=self.device, eps=self.eps, norm=self.norm,
                                   seed=self.seed, version=self.version)
        else:
            # The reference package prints and writes its log (its checks' "Warning: ..." lines
            # included) to log_path; the adapter reads the warnings back from that file.
            self._log_path = Path(tempfile.mkstemp(prefix="advvit-aa-", suffix=".log")[1])
            aa = module.AutoAttack(self.model, norm=self.norm, eps=self.eps,
                                   version=self.version,
                                   attacks_to_run=list(attacks) if attacks else [],
                                   log_path=str(self._log_path), verbose=False,
                                   seed=self.seed, device=self.device)
        if n_iter is not None:
            aa.apgd.n_iter = n_iter
            aa.apgd_targeted.n_iter = n_iter
            aa.fab.n_iter = n_iter
        if n_restarts is not None:
            aa.apgd.n_restarts = n_restarts
            aa.fab.n_restarts = n_restarts
            aa.square.n_restarts = n_restarts
        if n_queries is not None:
            aa.square.n_queries = n_queries
        if self.num_classes is not None and self.num_classes < 10:
            # AutoAttack's 9 target classes assume >= 10 classes; with fewer it indexes past
            # the class dimension. Target every other class instead.
            targets = max(self.num_classes - 1, 1)
            aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, targets)
            aa.fab.n_target_classes = min(aa.fab.n_target_classes, targets)
        return aa

    @property
    def attack_settings(self) -> dict[str, dict[str, int]]:
        """Iterations, restarts, targets and queries each attack of the ensemble runs with."""
        aa = self._aa
        apgd = {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts}
        if aa.apgd.eot_iter != 1:  # the rand version's EOT; 1 (none) elsewhere
            apgd["eot_iter"] = aa.apgd.eot_iter
        apgd_t = {"n_iter": aa.apgd_targeted.n_iter, "n_restarts": aa.apgd_targeted.n_restarts,
                  "n_target_classes": aa.apgd_targeted.n_target_classes}
        # The L1 standard version's eps schedule, which changes what the iterations do.
        for settings, attack in ((apgd, aa.apgd), (apgd_t, aa.apgd_targeted)):
            if attack.use_largereps:
                settings["use_largereps"] = True
        table = {
            "apgd-ce": apgd,
            "apgd-dlr": apgd,
            "apgd-t": apgd_t,
            "fab": {"n_iter": aa.fab.n_iter, "n_restarts": self._fab_restarts},
            # AutoAttack forces one restart for FAB-T whatever FAB was given.
            "fab-t": {"n_iter": aa.fab.n_iter, "n_restarts": 1,
                      "n_target_classes": aa.fab.n_target_classes},
            "square": {"n_queries": aa.square.n_queries, "n_restarts": aa.square.n_restarts},
        }
        return {name: dict(table[name]) for name in self.attacks}

    # ----------------------------------------------------------------------------- running
    def _run_one_batch(self, attack: str, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """AutoAttack's own loop on one batch with one attack enabled -> (x_adv, y_pred).

        AutoAttack's model checks run on the first batch of an evaluation only, as one direct
        AutoAttack call runs them once.
        """
        aa = self._aa
        aa.attacks_to_run = [attack]
        aa.fab.n_restarts = self._fab_restarts
        if self.backend == "pyautoattack":
            with _model_checks_skipped(self._checked):
                x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
        else:
            # Asked for, the reference package returns the labels it already computed: no
            # extra forward pass here.
            x_adv, y_adv = aa.run_standard_evaluation(x, y, bs=x.shape[0], return_labels=True)
        self._checked = True
        return x_adv.detach().cpu(), y_adv.detach().cpu()

    @property
    def suite(self) -> AttackSuite:
        """The ensemble as :func:`advvit.robustness.run_attacks` runs it."""
        settings = self.attack_settings
        attacks = tuple(BatchAttack(name, functools.partial(self._run_one_batch, name),
                                    settings[name]) for name in self.attacks)
        return AttackSuite(attacks, self.eps, self.norm, self.seed, self.version,
                           self.backend, self.backend_version)

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int = 250,
        state_path: str | os.PathLike | None = None,
        keep_adv: bool = True,
        stop_after_batches: int | None = None,
        on_batch: Callable[[str, int, int], None] | None = None,
        fp32_model: nn.Module | None = None,
        precision: str = "fp32",
    ) -> EnsembleResult:
        """Evaluate the ensemble on (x, y) with :func:`advvit.robustness.run_attacks`.

        Args:
            x: inputs, NCHW in [0, 1] (kept on the CPU; batches move to ``device``).
            y: integer labels, shape (N,).
            batch_size: AutoAttack's batch size.
            state_path: JSON file recording progress after every batch; an existing one for the
                same data and settings is resumed, one for other data or settings raises
                :class:`StateMismatchError`.
            keep_adv: return the adversarial examples (memory: one copy of x).
            stop_after_batches: stop after this many attack batches, leaving the state file
                for a later resume (for tests and for time-boxed jobs). The result then covers
                the work done so far.
            on_batch: called as ``on_batch(attack, batch_index, n_batches)`` after each batch.
            fp32_model, precision: the adapter's model runs the model ``fp32_model`` under
                autocast at ``precision``; ``fp32_model`` re-checks every break (see
                :func:`advvit.robustness.run_attacks`).

        Returns:
            An :class:`EnsembleResult` whose ``warnings`` are AutoAttack's own.

        Raises:
            ValueError: on mismatched shapes, values outside [0, 1] or a bad batch size.
            StateMismatchError: when ``state_path`` belongs to another evaluation.
        """
        self._checked = False
        with capture_autoattack_warnings() as aa_warnings:
            result = run_attacks(fp32_model if fp32_model is not None else self.model, x, y,
                                 self.suite, batch_size=batch_size, device=self.device,
                                 state_path=state_path, keep_adv=keep_adv,
                                 stop_after_batches=stop_after_batches, on_batch=on_batch,
                                 precision=precision)
        result.warnings = list(dict.fromkeys(list(aa_warnings) + self._reference_log_warnings()))
        return result

    def _reference_log_warnings(self) -> list[str]:
        log_path = getattr(self, "_log_path", None)
        if log_path is None or not log_path.exists():
            return []
        found: list[str] = []
        for line in log_path.read_text().splitlines():
            line = line.strip()
            if line.lower().startswith("warning:"):
                message = line.split(":", 1)[1].strip()
                if message not in found:
                    found.append(message)
        return found
