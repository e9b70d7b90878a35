"""Robust accuracy under a sequence of attacks: the one runner of advvit's evaluations.

Every attack (AutoAttack's through :mod:`advvit.autoattack_adapter`, PGD / FGSM from
:mod:`advvit.attacks`) is a :class:`BatchAttack`: a function from one batch to its adversarial
examples and the labels the model gives them. :func:`run_attacks` runs a suite of them the way
AutoAttack's own ensemble loop does: each attack sees only the examples still robust after the
attacks before it, cut into fixed batches, and the attack that first breaks an example is
recorded. After every batch the progress goes to a JSON state file, so an interrupted evaluation
resumes to exactly the result of an uninterrupted one (each attack re-seeds itself per batch).
The state file records what it is the progress of (the model's weights, the data, the attacks,
eps, seed, batch size) and is resumed only by the same evaluation; while a run uses it, it holds
the lock of ``<state file>.lock`` (:func:`advvit.io.lock_file`), so a second run on it at the
same time is refused and a lock left by a killed run is taken over.

Two cases give a result without attacking:

* eps 0: no input can move, so robust accuracy is the clean accuracy; every attack is recorded
  as skipped (0 seconds, 0 examples attacked).
* an attack that cannot get a gradient (a forward that detaches its input, for example) is
  recorded as failed with the reason; the examples it could not attack count as not broken by
  it, and the attacks after it still run. Any other error propagates.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .attacks import check_eps, fgsm, model_mode, pgd
from .weights import weights_digest
from .wrappers import unwrap
from .checks import missing_input_gradient
from .io import FileInUseError, atomic_write_json, lock_file

__all__ = [
    "AttackFn",
    "BatchAttack",
    "AttackSuite",
    "AttackOutcome",
    "EnsembleResult",
    "StateMismatchError",
    "STATE_FORMAT",
    "run_attacks",
    "merge_outcomes",
    "torch_attack_suite",
]

AttackFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
"""``fn(x, y) -> (x_adv, labels the model gives x_adv)`` on one batch already on the device."""

# Unchanged from the first (AutoAttack-only) runner, so its state files still resume.
STATE_FORMAT = "advvit-autoattack-state/1"

RAN, FAILED, SKIPPED = "ran", "failed", "skipped"
_STATE_KEYS = ("config", "clean", "robust", "broken_by", "done", "current")


class StateMismatchError(ValueError):
    """A state file this evaluation cannot use: it belongs to another evaluation (other model
    weights, inputs, attacks, eps or seed), is not a state file, or another run is using it."""


@dataclass(frozen=True)
class BatchAttack:
    """One attack as the runner calls it.

    Attributes:
        name: its name in results and reports ("apgd-ce", "pgd", ...).
        run: the attack on one batch (see :data:`AttackFn`).
        settings: what it runs with (iterations, restarts, ...), for the report and the state.
    """

    name: str
    run: AttackFn
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackSuite:
    """The attacks of one evaluation, in order, and what the result records about them.

    Attributes:
        attacks: run in this order, each on the examples the ones before it left robust.
        eps, norm, seed: the radius, norm and seed they were built with.
        version: AutoAttack's version ("standard", "plus", "rand", "custom") or "pgd" / "fgsm".
        backend, backend_version: the package that implements them ("" for advvit.attacks).
    """

    attacks: tuple[BatchAttack, ...]
    eps: float
    norm: str
    seed: int
    version: str
    backend: str = ""
    backend_version: str = ""

    @property
    def names(self) -> list[str]:
        """The attack names, in order."""
        return [a.name for a in self.attacks]

    @property
    def settings(self) -> dict[str, dict[str, Any]]:
        """Each attack's settings, by name."""
        return {a.name: dict(a.settings) for a in self.attacks}


@dataclass
class AttackOutcome:
    """Robust accuracy after one attack of a suite.

    Attributes:
        name: the attack's name.
        robust: per example, still correctly classified after this attack and all before it.
        seconds: wall time this attack took (summed over resumed runs).
        n_attacked: how many examples this attack was run on.
        status: "ran"; "failed" (it could not get a gradient: see ``reason``; the examples it
            did not attack count as not broken by it); "skipped" (eps 0: nothing to attack).
        reason: why it failed or was skipped; "" when it ran.
        false_breaks: examples the attack broke at low precision that the fp32 model still
            classified correctly (counted as not broken); 0 for an fp32 attack.
    """

    name: str
    robust: torch.Tensor
    seconds: float
    n_attacked: int
    status: str = RAN
    reason: str = ""
    false_breaks: int = 0

    @property
    def robust_accuracy(self) -> float:
        """Fraction of all examples still robust after this attack."""
        return float(self.robust.float().mean().item()) if self.robust.numel() else float("nan")


@dataclass
class EnsembleResult:
    """What one evaluation (one suite at one eps, on one shard or merged) found.

    Attributes:
        clean: per example, correctly classified without attack.
        robust: per example, correctly classified under every attack of the suite.
        attacks: one :class:`AttackOutcome` per attack, in order (cumulative).
        broken_by: per example, the attack that first broke it, "clean" when misclassified
            without attack, None when robust.
        x_adv: adversarial examples (x itself where no attack succeeded), or None when not kept.
            After a resume, examples broken before the interruption hold x (see ``adv_complete``).
        adv_complete: False when ``x_adv`` lacks examples broken before a resume.
        warnings: the attack package's own warnings (AutoAttack's checks), in order raised.
        backend, backend_version, version, norm, eps, seed, batch_size: how it was run.
        attack_settings: what each attack ran with, by name.
        complete: False when the run stopped early (``stop_after_batches``); the state file
            then holds the rest of the work.
        positions: where these examples sit in the whole evaluated list (a torchrun shard's
            share); None means 0..n-1.
        precision: what the attacks ran at: "fp32", or "bf16" / "fp16" under autocast with
            every break re-checked by the fp32 model.
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
    attack_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = True
    positions: list[int] | None = None
    precision: str = "fp32"

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
        """Fraction of examples that survived every attack."""
        return float(self.robust.float().mean().item()) if self.n else float("nan")

    @property
    def failed(self) -> list[AttackOutcome]:
        """The attacks that could not run (no gradient), in order."""
        return [a for a in self.attacks if a.status == FAILED]


# ------------------------------------------------------------------------------------- running

def _check_inputs(x: torch.Tensor, y: torch.Tensor, batch_size: int, suite: AttackSuite) -> None:
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y do not match: x has shape {tuple(x.shape)}, y has shape "
                         f"{tuple(y.shape)}; need x (N, ...) and integer labels y (N,)")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("inputs must be pixels in [0, 1] (normalization goes inside the "
                         f"model); got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_eps(suite.eps, suite.norm.lower(), input_shape=tuple(x.shape[1:]))


def _fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the inputs and labels, so a state file cannot be resumed on other data."""
    digest = hashlib.sha256()
    digest.update(str((tuple(x.shape), str(x.dtype))).encode())
    digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _state_config(suite: AttackSuite, fingerprint: str, n: int, batch_size: int,
                  model: str | None, precision: str) -> dict:
    config = {"backend": suite.backend, "version": suite.version, "attacks": suite.names,
              "settings": suite.settings, "eps": suite.eps, "norm": suite.norm,
              "seed": suite.seed, "batch_size": batch_size, "n": n, "data": fingerprint,
              "model": model}
    if precision != "fp32":  # absent from fp32 states, so those written before still resume
        config["precision"] = precision
    return config


def _load_state(path: Path | None, config: dict) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        state = json.loads(path.read_bytes())
    except OSError as err:
        raise StateMismatchError(f"state file {path} cannot be read ({err}): delete it to "
                                 "start the evaluation afresh") from err
    except ValueError:  # not JSON, or not even text
        state = None
    if (not isinstance(state, dict) or state.get("format") != STATE_FORMAT
            or any(k not in state for k in _STATE_KEYS) or not isinstance(state["config"], dict)):
        raise StateMismatchError(f"{path} is not an advvit evaluation state file: give "
                                 "another --state-path (or delete it, if it is a damaged one)")
    saved = state["config"]
    if saved.get("model") != config["model"]:
        why = ("it predates state files recording the model, so it cannot be matched to this one"
               if saved.get("model") is None else "it was written for other model weights: the "
               "checkpoint changed since, or another model is evaluated")
        raise StateMismatchError(f"state file {path} belongs to another evaluation ({why}): "
                                 "delete it to evaluate this model afresh, or give another "
                                 "state path")
    differs = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if differs:
        raise StateMismatchError(
            f"state file {path} belongs to another evaluation (differs in "
            f"{', '.join(differs)}): give another state path or delete it")
    return state


@contextlib.contextmanager
def _state_lock(path: Path | None) -> Iterator[None]:
    """Hold the state file's lock for the run; refuse one that another run holds."""
    if path is None:
        yield
        return
    try:
        lock = lock_file(path.with_name(path.name + ".lock"))
    except FileInUseError as err:
        raise StateMismatchError(f"state file {path} is in use by another evaluation "
                                 f"({err.holder or 'holder unknown'}): wait for it to finish, "
                                 "or give another state path") from None
    with lock:
        yield


def _save_state(path: Path | None, state: dict) -> None:
    if path is not None:
        atomic_write_json(path, state)


def _clean_predictions(model: nn.Module, x: torch.Tensor, batch_size: int,
                       device: torch.device) -> torch.Tensor:
    preds = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            preds.append(model(x[start:start + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _no_gradient_reason(model: nn.Module, x: torch.Tensor, err: Exception) -> str | None:
    """Why an attack raised, when the cause is a model that gives no input gradient; else None.

    The error itself is not parsed (autograd, APGD and FAB each fail differently): the model is
    probed, and only a confirmed missing gradient turns the error into a failed attack.
    """
    why = missing_input_gradient(model, x)
    if why is None:
        return None
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{why} ({type(err).__name__}: {first_line})"


def run_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    suite: AttackSuite,
    *,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    state_path: str | os.PathLike | None = None,
    keep_adv: bool = True,
    stop_after_batches: int | None = None,
    on_batch: Callable[[str, int, int], None] | None = None,
    precision: str = "fp32",
) -> EnsembleResult:
    """Run a suite on (x, y): each attack on the examples still robust, batch by batch.

    The model is in eval mode for the run and every submodule's mode is restored afterwards.
    With ``precision`` "bf16" or "fp16" the suite's attacks ran on ``model`` under autocast:
    an example they break counts as broken only if ``model`` itself (fp32) misclassifies the
    adversarial example; one they do not break stays robust (the fp32 check removes false
    breaks, not missed ones).

    Args:
        model: maps [0, 1] NCHW pixels to logits; already on ``device``.
        x: inputs in [0, 1] (kept on the CPU; batches move to ``device``).
        y: integer labels, shape (N,).
        suite: the attacks (:func:`torch_attack_suite`, ``AutoAttackAdapter.suite``).
        batch_size: how many examples each attack call gets.
        state_path: JSON file recording progress after every batch; an existing one for the
            same model weights, data and suite is resumed, one for another raises
            :class:`StateMismatchError`, as does one another run is using.
        keep_adv: return the adversarial examples (memory: one copy of x).
        stop_after_batches: stop after this many attack batches, leaving the state file for a
            later resume (time-boxed jobs, tests); the result covers the work done so far.
        on_batch: called as ``on_batch(attack, batch_index, n_batches)`` after each batch.
        precision: "fp32", or the autocast dtype the suite's attacks ran at.

    Raises:
        ValueError: mismatched shapes, values outside [0, 1], a bad batch size or eps.
        StateMismatchError: ``state_path`` belongs to another evaluation, is not a state
            file, or is in use by another run.
    """
    _check_inputs(x, y, batch_size, suite)
    x, y = x.detach().cpu(), y.detach().cpu().long()
    path = Path(state_path) if state_path is not None else None
    with model_mode(model, "eval"), _state_lock(path):
        return _Run(model, x, y, suite, batch_size, torch.device(device), path, keep_adv,
                    stop_after_batches, on_batch, precision).run()


_EPS0_REASON = "eps 0: no input can move, robust accuracy is the clean accuracy"


class _Run:
    """One :func:`run_attacks` call: the state file and the per-example bookkeeping."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: AttackSuite,
                 batch_size: int, device: torch.device, path: Path | None, keep_adv: bool,
                 stop_after_batches: int | None,
                 on_batch: Callable[[str, int, int], None] | None, precision: str) -> None:
        self.model, self.x, self.y, self.suite = model, x, y, suite
        self.precision = precision
        self.batch_size, self.device, self.path = batch_size, device, path
        self.stop_after_batches, self.on_batch = stop_after_batches, on_batch
        # Keyed by the weights, so a state is never resumed for a model that has changed; the
        # compiled wrapper renames every key, not the weights, so a compiled run resumes too.
        model_key = weights_digest(unwrap(model, "runtime").state_dict()) \
            if path is not None else None
        config = _state_config(suite, _fingerprint(x, y), x.shape[0], batch_size, model_key,
                               precision)
        state = _load_state(path, config)
        # Adversarial examples are not kept in the state file (for ImageNet they would be
        # gigabytes): those found before an interruption are missing from x_adv.
        self.adv_complete = state is None or all(b in (None, "clean") for b in state["broken_by"])
        if state is None:
            clean = (_clean_predictions(model, x, batch_size, device) == y).tolist()
            state = {"format": STATE_FORMAT, "config": config, "clean": clean, "robust": clean,
                     "broken_by": [None if c else "clean" for c in clean], "done": [],
                     "current": None}
            _save_state(path, state)
        self.state = state
        self.robust = torch.tensor(state["robust"], dtype=torch.bool)
        self.broken_by: list[str | None] = list(state["broken_by"])
        self.x_adv = x.clone() if keep_adv else None
        self.batches_run, self.stopped = 0, False

    def run(self) -> EnsembleResult:
        for attack in self.suite.attacks:
            if any(d["name"] == attack.name for d in self.state["done"]):
                continue
            current = self._current(attack.name)
            status, reason = self._attack(attack, current)
            if self.stopped:
                break
            self.state["done"].append({
                "name": attack.name, "robust": self.robust.tolist(),
                "seconds": current["seconds"],
                "n_attacked": min(len(current["todo"]), current["batches_done"] * self.batch_size),
                "status": status, "reason": reason,
                "false_breaks": current.get("false_breaks", 0)})
            self.state["current"] = None
            _save_state(self.path, self.state)
        return self._result()

    def _current(self, name: str) -> dict:
        current = self.state["current"]
        if current is None or current["name"] != name:
            # The examples robust now are this attack's work list, cut into fixed batches:
            # recorded so a resume attacks exactly the batches an uninterrupted run would.
            todo = [] if self.suite.eps == 0 else torch.nonzero(self.robust).flatten().tolist()
            current = {"name": name, "todo": todo, "batches_done": 0, "seconds": 0.0}
            self.state["current"] = current
        return current

    def _attack(self, attack: BatchAttack, current: dict) -> tuple[str, str]:
        """Run the attack's remaining batches -> (status, reason)."""
        if self.suite.eps == 0:
            return SKIPPED, _EPS0_REASON
        todo, bs = current["todo"], self.batch_size
        n_batches = (len(todo) + bs - 1) // bs
        for b in range(current["batches_done"], n_batches):
            if self.stop_after_batches is not None and self.batches_run >= self.stop_after_batches:
                self.stopped = True
                break
            idx = torch.tensor(todo[b * bs:(b + 1) * bs], dtype=torch.long)
            xb, yb = self.x[idx].to(self.device), self.y[idx].to(self.device)
            start = time.perf_counter()
            try:
                xb_adv, yb_adv = attack.run(xb, yb)
            except Exception as err:  # noqa: BLE001 - re-raised unless the gradient is missing
                reason = _no_gradient_reason(self.model, xb, err)
                if reason is None:
                    raise
                current["seconds"] += time.perf_counter() - start
                return FAILED, reason  # its other batches would fail alike: they stay robust
            current["seconds"] += time.perf_counter() - start
            xb_adv, yb_adv = xb_adv.detach().cpu(), yb_adv.detach().cpu()
            if self.precision != "fp32":
                yb_adv = self._fp32_labels(xb_adv, yb_adv, self.y[idx], current)
            self._record(attack.name, idx, xb_adv, yb_adv)
            current["batches_done"] = b + 1
            _save_state(self.path, self.state)
            self.batches_run += 1
            if self.on_batch is not None:
                self.on_batch(attack.name, b, n_batches)
        return RAN, ""

    def _fp32_labels(self, xb_adv: torch.Tensor, labels: torch.Tensor, yb: torch.Tensor,
                     current: dict) -> torch.Tensor:
        """The fp32 model's labels for the examples the low-precision attack broke."""
        broke = torch.nonzero(labels != yb).flatten()
        if broke.numel() == 0:
            return labels
        with torch.no_grad():
            fp32 = self.model(xb_adv[broke].to(self.device)).argmax(1).cpu()
        current["false_breaks"] = current.get("false_breaks", 0) + int((fp32 == yb[broke]).sum())
        labels = labels.clone()
        labels[broke] = fp32
        return labels

    def _record(self, name: str, idx: torch.Tensor, xb_adv: torch.Tensor,
                yb_adv: torch.Tensor) -> None:
        fooled = yb_adv != self.y[idx]
        for i in idx[fooled].tolist():
            self.robust[i] = False
            self.broken_by[i] = name
        if self.x_adv is not None:
            self.x_adv[idx[fooled]] = xb_adv[fooled].to(self.x_adv.dtype)
        self.state["robust"], self.state["broken_by"] = self.robust.tolist(), self.broken_by

    def _result(self) -> EnsembleResult:
        state, suite = self.state, self.suite
        outcomes = [AttackOutcome(d["name"], torch.tensor(d["robust"], dtype=torch.bool),
                                  float(d["seconds"]), int(d["n_attacked"]),
                                  d.get("status", RAN), d.get("reason", ""),
                                  int(d.get("false_breaks", 0)))
                    for d in state["done"]]
        return EnsembleResult(
            clean=torch.tensor(state["clean"], dtype=torch.bool), robust=self.robust,
            attacks=outcomes, broken_by=self.broken_by, x_adv=self.x_adv,
            adv_complete=self.adv_complete, warnings=[], backend=suite.backend,
            backend_version=suite.backend_version, version=suite.version, norm=suite.norm,
            eps=suite.eps, seed=suite.seed, batch_size=self.batch_size,
            attack_settings=suite.settings, complete=not self.stopped,
            precision=self.precision)


# ------------------------------------------------------------------------------------- shards

def _merged_status(outcomes: Sequence[AttackOutcome]) -> tuple[str, str]:
    for status in (FAILED, SKIPPED):
        hit = next((o for o in outcomes if o.status == status), None)
        if hit is not None:
            return status, hit.reason
    return RAN, ""


def merge_outcomes(parts: Sequence[EnsembleResult]) -> EnsembleResult:
    """Merge shard results (their ``positions`` index the whole list) into one.

    Times are the slowest shard's (the wall time of the whole evaluation); examples attacked
    are summed; an attack that failed on any shard is failed; warnings are joined.

    Raises:
        ValueError: shards that ran different attacks, or positions that overlap or leave gaps.
    """
    n = sum(p.n for p in parts)
    names = [a.name for a in parts[0].attacks]
    clean = torch.zeros(n, dtype=torch.bool)
    after = {name: torch.zeros(n, dtype=torch.bool) for name in names}
    broken: list[str | None] = [None] * n
    seen = torch.zeros(n, dtype=torch.bool)
    for p in parts:
        if [a.name for a in p.attacks] != names:
            raise ValueError("shards ran different attacks: cannot merge")
        positions = p.positions if p.positions is not None else list(range(p.n))
        pos = torch.tensor(positions, dtype=torch.long)
        if len(positions) != p.n or (pos.numel() and (pos.max() >= n or seen[pos].any())):
            raise ValueError("shard positions overlap or leave gaps: cannot merge")
        seen[pos] = True
        clean[pos] = p.clean
        for a in p.attacks:
            after[a.name][pos] = a.robust
        for k, b in zip(positions, p.broken_by):
            broken[k] = b
    attacks = []
    for i, name in enumerate(names):
        per_shard = [p.attacks[i] for p in parts]
        attacks.append(AttackOutcome(name, after[name], max(o.seconds for o in per_shard),
                                     sum(o.n_attacked for o in per_shard),
                                     *_merged_status(per_shard),
                                     sum(o.false_breaks for o in per_shard)))
    warnings: list[str] = []
    for p in parts:
        warnings += [w for w in p.warnings if w not in warnings]
    first = parts[0]
    return EnsembleResult(
        clean=clean, robust=after[names[-1]] if names else clean.clone(), attacks=attacks,
        broken_by=broken, x_adv=None, adv_complete=all(p.adv_complete for p in parts),
        warnings=warnings, backend=first.backend, backend_version=first.backend_version,
        version=first.version, norm=first.norm, eps=first.eps, seed=first.seed,
        batch_size=first.batch_size, attack_settings=first.attack_settings,
        complete=all(p.complete for p in parts), positions=None, precision=first.precision)


# ------------------------------------------------------------------------------ advvit.attacks

def _rng_devices(x: torch.Tensor) -> list:
    return [x.device] if x.is_cuda else []


def torch_attack_suite(model: nn.Module, kind: str, *, eps: float, norm: str = "linf",
                       steps: int | None = None, restarts: int | None = None,
                       step_size: float | None = None, seed: int = 0) -> AttackSuite:
    """PGD (random start) or FGSM (from the clean point) of :mod:`advvit.attacks` as a suite.

    Each batch is attacked ``restarts`` times, every restart on the batch's examples still
    robust; the batch re-seeds the random starts with ``seed`` (the caller's RNG is left as it
    was), so a result does not depend on what ran before it.

    Args:
        kind: "pgd" or "fgsm".
        steps: PGD iterations (default 10); FGSM is one step.
        restarts: attempts per example (default 1).
        step_size: None for advvit.attacks' 1.5 * eps / steps.
    """
    if kind not in ("pgd", "fgsm"):
        raise ValueError(f"kind must be 'pgd' or 'fgsm', got {kind!r}")
    n_steps = 1 if kind == "fgsm" else (steps or 10)
    n_restarts = restarts or 1

    def attack_once(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if kind == "fgsm":
            return fgsm(model, xb, yb, eps=eps, norm=norm, random_init=False, step_size=step_size)
        return pgd(model, xb, yb, eps=eps, norm=norm, steps=n_steps, step_size=step_size,
                   random_init=True)

    def run(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adv, pred = xb.clone(), yb.clone()  # the runner gives only correctly classified examples
        with torch.random.fork_rng(devices=_rng_devices(xb)):
            torch.manual_seed(seed)
            for _ in range(n_restarts):
                idx = torch.nonzero(pred == yb).flatten()
                if idx.numel() == 0:
                    break
                candidate = attack_once(xb[idx], yb[idx])
                with torch.no_grad():
                    labels = model(candidate).argmax(1)
                fooled = labels != yb[idx]
                adv[idx[fooled]] = candidate[fooled]
                pred[idx[fooled]] = labels[fooled]
        return adv, pred

    settings = {"steps": n_steps, "restarts": n_restarts, "step_size": step_size,
                "random_init": kind == "pgd"}
    return AttackSuite((BatchAttack(kind, run, settings),), float(eps), norm, int(seed), kind)
