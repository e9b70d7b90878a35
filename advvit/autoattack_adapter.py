"""One adapter over the AutoAttack code: pyautoattack or the reference ``autoattack`` package.

The two packages carry the same attacks (APGD-CE, APGD-DLR, APGD-T, FAB, FAB-T, Square) behind
different front classes: pyautoattack takes ``attacks=``/``batch_size=``/``state_path=`` and logs
to the ``auto-attack`` logger; the reference package takes ``attacks_to_run=``/``bs=``/``log_path=``
and prints. :class:`AutoAttackAdapter` hides the difference and adds what an evaluation report
needs and neither front class returns: robust accuracy and time after every attack, the attack
that broke each example, AutoAttack's own warnings, and a resumable state file.

How it runs: the ensemble loop is AutoAttack's. For each attack, the examples still robust are
cut into the same batches AutoAttack cuts them into, and each batch goes through the package's
own ``run_standard_evaluation`` with only that attack enabled. Every attack re-seeds itself at
the start of each batch, so the outcome equals one call of ``run_standard_evaluation`` on the
whole set (a test checks it). Recording progress per batch is what makes a resumed evaluation
equal an uninterrupted one: pyautoattack's own ``state_path`` re-batches an interrupted attack,
which changes its random starts.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import tempfile
import types
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from .io import atomic_write_json

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

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
"""The attack names both AutoAttack packages understand."""

BLACK_BOX_ATTACKS = frozenset({"square"})
"""Attacks that use no gradients: when they beat the others, gradients are likely masked."""

VERSIONS = ("standard", "plus", "custom")
Backend = Literal["auto", "pyautoattack", "autoattack"]
_STATE_FORMAT = "advvit-autoattack-state/1"
_AA_LOGGER = "auto-attack"


class StateMismatchError(ValueError):
    """A state file belongs to another evaluation (other model inputs, attacks, eps or seed)."""


def canonical_norm(norm: str) -> str:
    """Map "linf"/"Linf"/"l2"/"L2" to AutoAttack's spelling ("Linf", "L2").

    Raises:
        ValueError: for any other norm.
    """
    table = {"linf": "Linf", "l2": "L2"}
    key = str(norm).lower()
    if key not in table:
        raise ValueError(f"norm {norm!r} is not supported: use 'linf' or 'l2'")
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


@dataclass
class AttackOutcome:
    """Robust accuracy after one attack of an ensemble.

    Attributes:
        name: AutoAttack's name of the attack.
        robust: per example, still correctly classified after this attack and all before it.
        seconds: wall time this attack took (summed over resumed runs).
        n_attacked: how many examples this attack was run on (those robust before it).
    """

    name: str
    robust: torch.Tensor
    seconds: float
    n_attacked: int

    @property
    def robust_accuracy(self) -> float:
        """Fraction of all examples still robust after this attack."""
        return float(self.robust.float().mean().item()) if self.robust.numel() else float("nan")


@dataclass
class EnsembleResult:
    """What one AutoAttack evaluation found.

    Attributes:
        clean: per example, correctly classified without attack.
        robust: per example, correctly classified under every attack of the ensemble.
        attacks: one :class:`AttackOutcome` per attack run, in order (cumulative).
        broken_by: per example, the attack that first broke it, "clean" when misclassified
            without attack, None when robust.
        x_adv: adversarial examples (x itself where no attack succeeded), or None when not kept.
            After a resume, examples broken before the interruption hold x (see ``adv_complete``).
        adv_complete: False when ``x_adv`` lacks examples broken before a resume.
        complete: False when the run stopped early (``stop_after_batches``); the state file
            then holds the rest of the work.
        warnings: AutoAttack's own warnings, deduplicated, in the order raised.
        backend, backend_version, version, norm, eps, seed, batch_size: how it was run.
        attack_settings: iterations / restarts / targets / queries each attack used.
    """

    clean: torch.Tensor
    robust: torch.Tensor
    attacks: list[AttackOutcome]
    broken_by: list[str | None]
    x_adv: torch.Tensor | None
    adv_complete: bool
    warnings: list[str]
    backend: str
    backend_version: str
    version: str
    norm: str
    eps: float
    seed: int
    batch_size: int
    attack_settings: dict[str, dict[str, int]] = field(default_factory=dict)
    complete: bool = True

    @property
    def n(self) -> int:
        """Number of examples evaluated."""
        return int(self.clean.numel())

    @property
    def clean_accuracy(self) -> float:
        """Fraction of examples classified correctly without attack."""
        return float(self.clean.float().mean().item()) if self.n else float("nan")

    @property
    def robust_accuracy(self) -> float:
        """Fraction of examples that survived the whole ensemble."""
        return float(self.robust.float().mean().item()) if self.n else float("nan")


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


def _fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the inputs and labels, so a state file cannot be resumed on other data."""
    digest = hashlib.sha256()
    digest.update(str((tuple(x.shape), str(x.dtype))).encode())
    digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


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
    """Run AutoAttack (standard, plus, or a custom list of its attacks) on a model.

    The model must map [0, 1] NCHW pixels to logits; any normalization belongs inside it. It is
    put in eval mode for the run (AutoAttack's standard version never does) and its mode is
    restored afterwards.

    Args:
        model: the classifier.
        eps: perturbation budget in pixel units (e.g. 4/255).
        norm: "linf" or "l2" (any case).
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square as published), "plus", or "custom"
            (then ``attacks`` names the attacks, in order).
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
        ValueError: on an unknown version, attack, norm, or a non-positive knob.
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
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
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
        table = {
            "apgd-ce": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts},
            "apgd-dlr": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts},
            "apgd-t": {"n_iter": aa.apgd_targeted.n_iter,
                       "n_restarts": aa.apgd_targeted.n_restarts,
                       "n_target_classes": aa.apgd_targeted.n_target_classes},
            "fab": {"n_iter": aa.fab.n_iter, "n_restarts": aa.fab.n_restarts},
            # AutoAttack forces one restart for FAB-T whatever FAB was given.
            "fab-t": {"n_iter": aa.fab.n_iter, "n_restarts": 1,
                      "n_target_classes": aa.fab.n_target_classes},
            "square": {"n_queries": aa.square.n_queries, "n_restarts": aa.square.n_restarts},
        }
        return {name: dict(table[name]) for name in self.attacks}

    # ----------------------------------------------------------------------------- running
    def _run_one_batch(self, attack: str, x: torch.Tensor, y: torch.Tensor, *,
                       checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """AutoAttack's own loop on one batch with one attack enabled -> (x_adv, y_pred).

        ``checked``: AutoAttack's model checks already ran on an earlier batch of this
        evaluation; they are skipped here, as one direct AutoAttack call runs them once.
        """
        aa = self._aa
        aa.attacks_to_run = [attack]
        if self.backend == "pyautoattack":
            with _model_checks_skipped(checked):
                out = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
        else:
            out = aa.run_standard_evaluation(x, y, bs=x.shape[0])
        if isinstance(out, tuple):
            x_adv, y_adv = out[0], out[1]
        else:  # the reference package returns labels only when asked (return_labels=True)
            x_adv = out
            with torch.no_grad():
                y_adv = self.model(x_adv.to(self.device)).argmax(1)
        return x_adv.detach().cpu(), y_adv.detach().cpu()

    def _clean_predictions(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        preds = []
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(self.device)
                preds.append(self.model(xb).argmax(1).cpu())
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)

    def _state_config(self, fingerprint: str, n: int, batch_size: int) -> dict:
        return {"backend": self.backend, "version": self.version, "attacks": self.attacks,
                "settings": self.attack_settings, "eps": self.eps, "norm": self.norm,
                "seed": self.seed, "batch_size": batch_size, "n": n, "data": fingerprint}

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
    ) -> EnsembleResult:
        """Evaluate the ensemble on (x, y).

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

        Returns:
            An :class:`EnsembleResult`.

        Raises:
            ValueError: on mismatched shapes, values outside [0, 1] or a bad batch size.
            StateMismatchError: when ``state_path`` belongs to another evaluation.
        """
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y do not match: x has shape {tuple(x.shape)}, y has shape "
                             f"{tuple(y.shape)}; need x (N, ...) and integer labels y (N,)")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("inputs must be pixels in [0, 1] (normalization goes inside the "
                             f"model); got values in [{x.min().item():.3g}, "
                             f"{x.max().item():.3g}]")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        x = x.detach().cpu()
        y = y.detach().cpu().long()
        n = x.shape[0]
        path = Path(state_path) if state_path is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            with capture_autoattack_warnings() as aa_warnings:
                result = self._run(x, y, n, batch_size, path, keep_adv, stop_after_batches,
                                   on_batch)
        finally:
            self.model.train(was_training)
        result.warnings = list(dict.fromkeys(list(aa_warnings) + self._reference_log_warnings()))
        return result

    def _run(self, x, y, n, batch_size, path, keep_adv, stop_after_batches, on_batch
             ) -> EnsembleResult:
        config = self._state_config(_fingerprint(x, y), n, batch_size)
        state = self._load_state(path, config)
        # Adversarial examples are not kept in the state file (for ImageNet they would be
        # gigabytes): those found before an interruption are missing from x_adv.
        adv_complete = state is None or all(b in (None, "clean") for b in state["broken_by"])
        if state is None:
            clean = (self._clean_predictions(x, batch_size) == y)
            state = {"format": _STATE_FORMAT, "config": config,
                     "clean": clean.tolist(), "robust": clean.tolist(),
                     "broken_by": [None if c else "clean" for c in clean.tolist()],
                     "done": [], "current": None}
            self._save_state(path, state)
        robust = torch.tensor(state["robust"], dtype=torch.bool)
        broken_by: list[str | None] = list(state["broken_by"])
        x_adv = x.clone() if keep_adv else None
        batches_run = 0
        stopped = False
        for attack in self.attacks:
            if any(d["name"] == attack for d in state["done"]):
                continue
            current = state["current"]
            if current is None or current["name"] != attack:
                # The examples robust now are this attack's work list, cut into fixed batches:
                # recorded so a resume attacks exactly the batches an uninterrupted run would.
                todo = torch.nonzero(robust).flatten().tolist()
                current = {"name": attack, "todo": todo, "batches_done": 0, "seconds": 0.0}
                state["current"] = current
            todo = current["todo"]
            n_batches = (len(todo) + batch_size - 1) // batch_size
            for b in range(current["batches_done"], n_batches):
                if stop_after_batches is not None and batches_run >= stop_after_batches:
                    stopped = True
                    break
                idx = torch.tensor(todo[b * batch_size:(b + 1) * batch_size], dtype=torch.long)
                start = time.perf_counter()
                xb_adv, yb_adv = self._run_one_batch(attack, x[idx], y[idx],
                                                     checked=batches_run > 0)
                current["seconds"] += time.perf_counter() - start
                fooled = yb_adv != y[idx]
                for i in idx[fooled].tolist():
                    robust[i] = False
                    broken_by[i] = attack
                if x_adv is not None:
                    x_adv[idx[fooled]] = xb_adv[fooled].to(x_adv.dtype)
                current["batches_done"] = b + 1
                state["robust"], state["broken_by"] = robust.tolist(), broken_by
                self._save_state(path, state)
                batches_run += 1
                if on_batch is not None:
                    on_batch(attack, b, n_batches)
            if stopped:
                break
            state["done"].append({"name": attack, "robust": robust.tolist(),
                                  "seconds": current["seconds"], "n_attacked": len(todo)})
            state["current"] = None
            self._save_state(path, state)
        outcomes = [AttackOutcome(d["name"], torch.tensor(d["robust"], dtype=torch.bool),
                                  float(d["seconds"]), int(d["n_attacked"]))
                    for d in state["done"]]
        return EnsembleResult(
            clean=torch.tensor(state["clean"], dtype=torch.bool), robust=robust,
            attacks=outcomes, broken_by=broken_by, x_adv=x_adv,
            adv_complete=adv_complete, warnings=[], backend=self.backend,
            backend_version=self.backend_version, version=self.version, norm=self.norm,
            eps=self.eps, seed=self.seed, batch_size=batch_size,
            attack_settings=self.attack_settings, complete=not stopped)

    # ----------------------------------------------------------------------------- state
    @staticmethod
    def _load_state(path: Path | None, config: dict) -> dict | None:
        if path is None or not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StateMismatchError(f"state file {path} cannot be read ({err}): delete it to "
                                     "start the evaluation afresh") from err
        if state.get("format") != _STATE_FORMAT:
            raise StateMismatchError(f"{path} is not an advvit AutoAttack state file: give "
                                     "another --state-path")
        saved = state.get("config", {})
        differs = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if differs:
            raise StateMismatchError(
                f"state file {path} belongs to another evaluation (differs in "
                f"{', '.join(differs)}): give another state path or delete it")
        return state

    @staticmethod
    def _save_state(path: Path | None, state: dict) -> None:
        if path is not None:
            atomic_write_json(path, state)

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
