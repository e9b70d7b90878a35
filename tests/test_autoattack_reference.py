"""The reference AutoAttack backend, tested against the real package's API shape.

The reference package (github.com/fra31/auto-attack, imported as ``autoattack``) is not on PyPI
and its code may not be copied here, so the tests cannot install it. What they hold instead is a
record of the API facts the adapter relies on, read from ``autoattack/autoattack.py`` and the
attack classes at fra31/auto-attack commit a39220048b3c9f2cca9a4d3a54604793c68eca7e (2023-01-09,
the newest): the signatures of ``AutoAttack.__init__`` and ``run_standard_evaluation``, the
attributes an ``AutoAttack`` and its four attack objects have after construction, the attack
lists and settings ``set_version`` fixes, and where its checks' warnings go (``logger.log
("Warning: ...")``: lines in ``log_path``, never Python's ``logging``).

A stand-in alone cannot catch a drift between the adapter and the real package: it accepts
whatever the adapter calls. So the chain is checked link by link:

1. the fake module below has exactly the recorded signatures (``inspect.signature``), so Python
   itself refuses any call the real methods would refuse (an unknown keyword such as
   pyautoattack's ``batch_size=``, a missing argument);
2. every attribute the adapter reads or writes on the fake ``AutoAttack`` or its attack objects
   must be a recorded one (anything else raises), so a knob the real package lacks fails;
3. through the fake (which runs pyautoattack's attacks, the same code as the reference's) the
   adapter gives pyautoattack's results, the recorded attack lists and settings, and the
   warnings that only the log file carries;
4. where the real package is installed, the record is compared with it (else that test skips).

When the reference package changes, update the record from its source: the tests then show what
the adapter must change.
"""
from __future__ import annotations

import inspect
import logging
import sys
import types

import pytest
import torch
from torch import nn

import advvit  # noqa: F401  (before anything that imports timm)
from advvit.autoattack_adapter import AutoAttackAdapter

REFERENCE = "fra31/auto-attack@a39220048b3c9f2cca9a4d3a54604793c68eca7e"
_NO_DEFAULT = inspect.Parameter.empty

# (name, default) of each positional-or-keyword parameter, in order.
RECORDED_SIGNATURES = {
    "__init__": (("self", _NO_DEFAULT), ("model", _NO_DEFAULT), ("norm", "Linf"), ("eps", 0.3),
                 ("seed", None), ("verbose", True), ("attacks_to_run", []), ("version", "standard"),
                 ("is_tf_model", False), ("device", "cuda"), ("log_path", None)),
    "run_standard_evaluation": (("self", _NO_DEFAULT), ("x_orig", _NO_DEFAULT), ("y_orig", _NO_DEFAULT),
                                ("bs", 250), ("return_labels", False), ("state_path", None)),
}
# Instance attributes after __init__ (vars() of each object).
RECORDED_ATTRIBUTES = {
    "AutoAttack": {"apgd", "apgd_targeted", "attacks_to_run", "device", "epsilon", "fab", "is_tf_model",
                   "logger", "model", "norm", "seed", "square", "verbose", "version"},
    "apgd": {"device", "eot_iter", "eps", "eps_orig", "is_tf_model", "logger", "loss", "model", "n_iter",
             "n_iter_2", "n_iter_min", "n_iter_orig", "n_restarts", "norm", "seed", "size_decr", "thr_decr",
             "topk", "use_largereps", "use_rs", "verbose", "y_target"},
    "apgd_targeted": {"device", "eot_iter", "eps", "eps_orig", "is_tf_model", "logger", "loss", "model",
                      "n_iter", "n_iter_2", "n_iter_min", "n_iter_orig", "n_restarts", "n_target_classes",
                      "norm", "seed", "size_decr", "thr_decr", "topk", "use_largereps", "use_rs", "verbose",
                      "y_target"},
    "fab": {"alpha_max", "beta", "device", "eps", "eta", "n_iter", "n_restarts", "n_target_classes", "norm",
            "predict", "seed", "target_class", "targeted", "verbose"},
    "square": {"device", "eps", "loss", "n_queries", "n_restarts", "norm", "p_init", "predict",
               "rescale_schedule", "return_all", "seed", "targeted", "verbose"},
}
ATTACK_OBJECTS = ("apgd", "apgd_targeted", "fab", "square")
# set_version(version) for Linf / L2 (n_iter stays the constructor's 100).
RECORDED_VERSIONS = {
    "standard": (["apgd-ce", "apgd-t", "fab-t", "square"],
                 {"apgd": {"n_restarts": 1}, "apgd_targeted": {"n_restarts": 1, "n_target_classes": 9},
                  "fab": {"n_restarts": 1, "n_target_classes": 9}, "square": {"n_queries": 5000}}),
    "plus": (["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
             {"apgd": {"n_restarts": 5}, "apgd_targeted": {"n_restarts": 1, "n_target_classes": 9},
              "fab": {"n_restarts": 5, "n_target_classes": 9}, "square": {"n_queries": 5000}}),
}


def _recorded_signature(method: str) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind, default=d) for n, d in RECORDED_SIGNATURES[method]])


def _check_recorded(owner: str, name: str) -> None:
    if name not in RECORDED_ATTRIBUTES[owner]:
        raise AttributeError(f"the reference package's {owner} has no attribute {name!r} ({REFERENCE}); "
                             f"it has {sorted(RECORDED_ATTRIBUTES[owner])}")


class _RecordedAttack:
    """One of AutoAttack's attack objects, allowing only the recorded attribute names."""

    def __init__(self, target: object, owner: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name: str):
        _check_recorded(self._owner, name)
        return getattr(self._target, name)

    def __setattr__(self, name: str, value) -> None:
        _check_recorded(self._owner, name)
        setattr(self._target, name, value)


class _ReferenceLogger:
    """The reference's ``other_utils.Logger`` (``log`` appends a line to ``log_path``), also
    answering the ``logging`` calls pyautoattack's checks make, routed as the reference routes
    them: a check's warning becomes a ``Warning: ...`` line; progress only when verbose."""

    def __init__(self, log_path: str | None, verbose: bool) -> None:
        self.log_path = log_path
        self.verbose = verbose

    def log(self, text: str) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(text + "\n")

    def warning(self, message: str) -> None:
        self.log(f"Warning: {message}")

    def debug(self, message: str) -> None:
        if self.verbose:
            self.log(message)

    info = debug


class AutoAttack:
    """The reference ``AutoAttack``: its signatures and attributes, pyautoattack's attacks inside."""

    def __init__(self, model, norm='Linf', eps=.3, seed=None, verbose=True, attacks_to_run=[],  # noqa: B006
                 version='standard', is_tf_model=False, device='cuda', log_path=None):
        import pyautoattack

        assert norm in ['Linf', 'L2', 'L1']  # as the reference does
        if version in ['standard', 'plus', 'rand'] and attacks_to_run != []:
            raise ValueError("attacks_to_run will be overridden unless you use version='custom'")
        inner = pyautoattack.AutoAttack(model, attacks=list(attacks_to_run) or None, device=device, eps=eps,
                                        norm=norm, seed=seed, version=version)
        logger = _ReferenceLogger(log_path, verbose)
        for holder in (inner, inner.apgd, inner.apgd_targeted):
            holder.logger = logger
        inner.verbose, inner.is_tf_model = verbose, is_tf_model
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str):
        _check_recorded("AutoAttack", name)
        value = getattr(self._inner, name)
        return _RecordedAttack(value, name) if name in ATTACK_OBJECTS else value

    def __setattr__(self, name: str, value) -> None:
        _check_recorded("AutoAttack", name)
        setattr(self._inner, name, value)

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
        x_adv, y_adv = self._inner.run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
        return (x_adv, y_adv) if return_labels else x_adv


@pytest.fixture
def reference(monkeypatch):
    """The fake reference package in place of ``autoattack`` (which it has no ``__version__`` of,
    as the real one)."""
    module = types.ModuleType("autoattack")
    module.AutoAttack = AutoAttack
    monkeypatch.setitem(sys.modules, "autoattack", module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(version="custom", n_iter=5, n_restarts=1)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(49, 10)).eval()


def test_the_fake_has_the_recorded_signatures():
    for method in RECORDED_SIGNATURES:
        assert inspect.signature(getattr(AutoAttack, method)) == _recorded_signature(method), method


def test_the_fake_refuses_what_the_real_package_would(reference):
    model = _tiny_model()
    with pytest.raises(TypeError, match="batch_size"):  # pyautoattack's keyword, not the reference's
        AutoAttack(model, device="cpu").run_standard_evaluation(torch.rand(2, 1, 7, 7), torch.zeros(2).long(),
                                                                batch_size=2)
    with pytest.raises(ValueError, match="overridden"):
        AutoAttack(model, version="standard", attacks_to_run=["apgd-ce"], device="cpu")
    aa = AutoAttack(model, version="custom", attacks_to_run=["apgd-ce"], device="cpu")
    with pytest.raises(AttributeError, match="no attribute 'n_queries'"):
        aa.apgd.n_queries = 10
    with pytest.raises(AttributeError, match="no attribute 'eps'"):
        aa.eps  # noqa: B018  (the reference calls it epsilon)


@pytest.mark.parametrize("version", ["standard", "plus"])
def test_the_adapter_builds_the_published_versions_as_the_reference_does(reference, version):
    attacks, settings = RECORDED_VERSIONS[version]
    adapter = AutoAttackAdapter(_tiny_model(), eps=8 / 255, version=version, backend="autoattack")
    assert adapter.backend == "autoattack" and adapter.backend_version == "unknown"
    assert adapter.attacks == attacks
    for owner, values in settings.items():
        for name, value in values.items():
            assert getattr(getattr(adapter._aa, owner), name) == value, (owner, name)


def test_the_adapter_uses_only_the_recorded_api_and_equals_pyautoattack(reference):
    """Every knob (n_iter, n_restarts, n_queries, target classes for few classes) is set through
    recorded attributes, every call binds to the recorded signatures, and the result is
    pyautoattack's."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    x = torch.rand(12, 1, 7, 7)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct, so every attack has work
    kw = dict(eps=0.05, seed=0, attacks=["apgd-ce", "apgd-t", "fab-t", "square"], n_queries=20,
              num_classes=5, **FAST)
    ref = AutoAttackAdapter(model, backend="autoattack", **kw)
    assert ref.attack_settings["apgd-t"]["n_target_classes"] == 4
    a = ref.run(x, y, batch_size=5)
    b = AutoAttackAdapter(model, backend="pyautoattack", **kw).run(x, y, batch_size=5)
    assert a.robust_accuracy < 1.0
    assert torch.equal(a.robust, b.robust) and torch.equal(a.x_adv, b.x_adv)
    assert a.broken_by == b.broken_by and a.attack_settings == b.attack_settings


def test_reference_warnings_come_from_its_log_file_only(reference):
    """The reference's checks write ``Warning: ...`` to log_path and nothing to ``logging``: the
    adapter must read them from the file (here: a softmax output flagged once)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("auto-attack").addHandler(handler)
    try:
        model = nn.Sequential(_tiny_model(), nn.Softmax(dim=1))
        x = torch.rand(8, 1, 7, 7)
        with torch.no_grad():
            y = model(x).argmax(1)
        result = AutoAttackAdapter(model, eps=0.01, seed=0, attacks=["apgd-ce"], backend="autoattack",
                                   **FAST).run(x, y, batch_size=4)
    finally:
        logging.getLogger("auto-attack").removeHandler(handler)
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    assert sum("probability distribution" in w for w in result.warnings) == 1


def test_the_record_matches_the_installed_reference_package():
    """Only where the real package is installed (pip install git+https://github.com/fra31/auto-attack)."""
    real = pytest.importorskip("autoattack")
    if real.AutoAttack is AutoAttack or not hasattr(real, "AutoAttack"):
        pytest.skip("autoattack is not the reference package")
    for method in RECORDED_SIGNATURES:
        assert inspect.signature(getattr(real.AutoAttack, method)) == _recorded_signature(method), method
    model = _tiny_model()
    for version, (attacks, settings) in RECORDED_VERSIONS.items():
        aa = real.AutoAttack(model, norm="Linf", eps=0.1, version=version, device="cpu", verbose=False)
        assert set(vars(aa)) == RECORDED_ATTRIBUTES["AutoAttack"]
        assert aa.attacks_to_run == attacks
        for owner in ATTACK_OBJECTS:
            assert set(vars(getattr(aa, owner))) == RECORDED_ATTRIBUTES[owner], owner
        for owner, values in settings.items():
            for name, value in values.items():
                assert getattr(getattr(aa, owner), name) == value, (version, owner, name)
