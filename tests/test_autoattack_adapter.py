"""The AutoAttack adapter on a small model trained here on real Fashion-MNIST (7x7 pixels)."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advvit  # noqa: F401  (before anything that imports timm)
from advvit.autoattack_adapter import (AutoAttackAdapter, StateMismatchError,
                                       capture_autoattack_warnings)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FAST = dict(version="custom", n_iter=10, n_restarts=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _fashion_mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST idx files not found in {FMNIST}")
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    x = F.avg_pool2d(torch.tensor(images, dtype=torch.float32) / 255, 4)  # 1x7x7, in [0, 1]
    return x, torch.tensor(labels, dtype=torch.long)


def train_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP trained for a fraction of a second: ~75% clean accuracy on held-out images."""
    torch.manual_seed(0)
    x, y = _fashion_mnist(3000)
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        perm = torch.randperm(2500)
        for i in range(0, 2500, 250):
            idx = perm[i:i + 250]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = x[2500:], y[2500:]
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.6  # it did learn
    return model, xt[:48], yt[:48]


@pytest.fixture(scope="module")
def trained():
    return train_mlp()


def test_eps_zero_gives_robust_equal_clean(trained):
    model, x, y = trained
    result = AutoAttackAdapter(model, eps=0.0, attacks=["apgd-ce", "apgd-t"], seed=0,
                               **FAST).run(x, y, batch_size=16)
    assert 0 < result.clean_accuracy < 1
    assert torch.equal(result.robust, result.clean)
    assert [a.name for a in result.attacks] == ["apgd-ce", "apgd-t"]


def test_large_eps_breaks_everything_and_robust_never_exceeds_clean(trained):
    model, x, y = trained
    accs = []
    for eps in (1 / 255, 4 / 255, 0.3):
        r = AutoAttackAdapter(model, eps=eps, attacks=["apgd-ce"], seed=0, **FAST).run(
            x, y, batch_size=48)
        # an example robust under attack was correctly classified without it
        assert not (r.robust & ~r.clean).any()
        assert r.robust_accuracy <= r.clean_accuracy
        accs.append(r.robust_accuracy)
        assert r.x_adv is not None
        assert (r.x_adv - x).abs().max() <= eps + 1e-6
        assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[0] > accs[2]
    assert accs[2] <= 0.05


def test_l2_norm_stays_in_the_ball(trained):
    model, x, y = trained
    r = AutoAttackAdapter(model, eps=0.5, norm="l2", attacks=["apgd-ce"], seed=0,
                          **FAST).run(x, y, batch_size=48)
    assert r.norm == "L2"
    assert r.robust_accuracy < r.clean_accuracy
    assert (r.x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-4


def test_l1_norm_stays_in_the_ball_and_the_box(trained):
    model, x, y = trained
    eps = 2.0  # of the 1x7x7 box's L1 diagonal, 49
    r = AutoAttackAdapter(model, eps=eps, norm="l1", attacks=["apgd-ce"], seed=0,
                          **FAST).run(x, y, batch_size=48)
    assert r.norm == "L1"
    assert r.robust_accuracy < r.clean_accuracy
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert (r.x_adv - x).flatten(1).abs().sum(1).max() <= eps + 1e-4


def test_the_l1_standard_version_is_autoattacks_for_l1():
    # AutoAttack's standard version for L1: APGD-CE 5 restarts, APGD-T 5 targets, both with
    # the larger-eps schedule of "Mind the box"; FAB-T and Square as for Linf.
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 10))
    aa = AutoAttackAdapter(model, eps=12.0, norm="L1", version="standard", seed=0,
                           backend="pyautoattack")
    assert aa.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    s = aa.attack_settings
    assert s["apgd-ce"] == {"n_iter": 100, "n_restarts": 5, "use_largereps": True}
    assert s["apgd-t"] == {"n_iter": 100, "n_restarts": 1, "n_target_classes": 5,
                           "use_largereps": True}
    assert s["fab-t"]["n_target_classes"] == 9 and s["square"]["n_queries"] == 5000
    linf = AutoAttackAdapter(model, eps=4 / 255, version="standard", seed=0,
                             backend="pyautoattack").attack_settings
    assert "use_largereps" not in linf["apgd-ce"]


@pytest.mark.slow
def test_l1_standard_autoattack_equals_calling_autoattack_directly(trained):
    from pyautoattack import AutoAttack

    model, x, y = trained
    x, y, eps = x[:12], y[:12], 1.0
    result = AutoAttackAdapter(model, eps=eps, norm="l1", version="standard", seed=0,
                               backend="pyautoattack").run(x, y, batch_size=5)
    direct = AutoAttack(model, eps=eps, norm="L1", seed=0, version="standard")
    x_adv, y_adv = direct.run_standard_evaluation(x, y, batch_size=5)
    assert torch.equal(result.robust, y_adv == y)
    assert torch.equal(result.x_adv, x_adv)
    assert 0 < result.robust_accuracy < result.clean_accuracy


def test_same_seed_same_result(trained):
    model, x, y = trained
    kw = dict(eps=3 / 255, attacks=["apgd-ce", "square"], seed=7, version="custom",
              n_iter=10, n_restarts=1, n_queries=50)
    a = AutoAttackAdapter(model, **kw).run(x, y, batch_size=16)
    b = AutoAttackAdapter(model, **kw).run(x, y, batch_size=16)
    assert torch.equal(a.robust, b.robust)
    assert torch.equal(a.x_adv, b.x_adv)
    assert a.broken_by == b.broken_by


def test_resumed_evaluation_equals_uninterrupted(trained, tmp_path):
    model, x, y = trained
    kw = dict(eps=3 / 255, attacks=["apgd-ce", "apgd-t"], seed=1, **FAST)
    full = AutoAttackAdapter(model, **kw).run(x, y, batch_size=8)

    state = tmp_path / "state.json"
    part = AutoAttackAdapter(model, **kw).run(x, y, batch_size=8, state_path=state,
                                              stop_after_batches=2)
    assert not part.complete and state.exists()
    saved = json.loads(state.read_text())
    assert saved["current"]["name"] == "apgd-ce" and saved["current"]["batches_done"] == 2

    resumed = AutoAttackAdapter(model, **kw).run(x, y, batch_size=8, state_path=state)
    assert resumed.complete
    assert torch.equal(resumed.robust, full.robust)
    assert resumed.broken_by == full.broken_by
    assert [(a.name, a.robust_accuracy) for a in resumed.attacks] == \
        [(a.name, a.robust_accuracy) for a in full.attacks]
    assert full.robust_accuracy < full.clean_accuracy  # the attacks did something
    assert not resumed.adv_complete  # examples broken before the stop are not in x_adv


def test_state_of_another_evaluation_is_refused(trained, tmp_path):
    model, x, y = trained
    state = tmp_path / "state.json"
    AutoAttackAdapter(model, eps=2 / 255, attacks=["apgd-ce"], seed=0, **FAST).run(
        x, y, batch_size=16, state_path=state)
    with pytest.raises(StateMismatchError, match="eps"):
        AutoAttackAdapter(model, eps=4 / 255, attacks=["apgd-ce"], seed=0, **FAST).run(
            x, y, batch_size=16, state_path=state)
    with pytest.raises(StateMismatchError, match="data"):
        AutoAttackAdapter(model, eps=2 / 255, attacks=["apgd-ce"], seed=0, **FAST).run(
            x.flip(0), y.flip(0), batch_size=16, state_path=state)


@pytest.mark.slow
def test_standard_autoattack_equals_calling_autoattack_directly(trained):
    """The real standard AutoAttack end to end, through the adapter and directly."""
    from pyautoattack import AutoAttack

    model, x, y = trained
    x, y = x[:12], y[:12]
    eps = 4 / 255
    result = AutoAttackAdapter(model, eps=eps, version="standard", seed=0,
                               backend="pyautoattack").run(x, y, batch_size=5)
    assert [a.name for a in result.attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.attack_settings["apgd-ce"] == {"n_iter": 100, "n_restarts": 1}
    assert result.attack_settings["square"]["n_queries"] == 5000

    direct = AutoAttack(model, eps=eps, norm="Linf", seed=0, version="standard")
    x_adv, y_adv = direct.run_standard_evaluation(x, y, batch_size=5)
    assert torch.equal(result.robust, y_adv == y)
    assert torch.equal(result.x_adv, x_adv)
    assert 0 < result.robust_accuracy < result.clean_accuracy  # a case with work for AA


def test_model_is_attacked_in_eval_mode_and_mode_restored(trained):
    model, x, y = trained
    modes = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, t):
            modes.append(self.training)
            return self.inner(t)

    spy = Spy().train()
    AutoAttackAdapter(spy, eps=2 / 255, attacks=["apgd-ce"], seed=0, **FAST).run(
        x[:8], y[:8], batch_size=8)
    assert modes and not any(modes)
    assert spy.training


def test_autoattack_own_warnings_are_collected(trained):
    model, x, y = trained
    softmax_model = nn.Sequential(model, nn.Softmax(dim=1))
    r = AutoAttackAdapter(softmax_model, eps=2 / 255, attacks=["apgd-ce"], seed=0,
                          **FAST).run(x[:8], y[:8], batch_size=8)
    assert any("probability distribution" in w for w in r.warnings)
    # one message, even though AutoAttack's checks ran once per batch
    assert len(r.warnings) == len(set(r.warnings))


def test_capture_collects_logger_warnings():
    with capture_autoattack_warnings() as found:
        logging.getLogger("auto-attack").warning("it seems to be a randomized defense!")
        logging.getLogger("auto-attack").warning("it seems to be a randomized defense!")
    assert found == ["it seems to be a randomized defense!"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.1, version="custom", attacks=["pgd"]), "unknown AutoAttack attack"),
    (dict(eps=0.1, version="custom"), "needs attacks"),
    (dict(eps=0.1, version="fast"), "version 'fast' is unknown"),
    (dict(eps=0.1, norm="l1x"), "norm"),
    (dict(eps=-0.1), "eps must be"),
    (dict(eps=0.1, version="standard", n_iter=5), "version='custom'"),
    (dict(eps=0.1, version="custom", attacks=["apgd-ce"], n_iter=0), "n_iter"),
    (dict(eps=0.1, seed=None), "seed"),
    (dict(eps=0.1, backend="torchattacks"), "backend"),
])
def test_bad_settings_get_one_clear_error(kwargs, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 10))
    with pytest.raises(ValueError, match=match):
        AutoAttackAdapter(model, **kwargs)


def test_bad_data_gets_one_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 10))
    adapter = AutoAttackAdapter(model, eps=0.1, attacks=["apgd-ce"], **FAST)
    with pytest.raises(ValueError, match="do not match"):
        adapter.run(torch.rand(4, 1, 7, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adapter.run(torch.rand(4, 1, 7, 7) * 255, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        adapter.run(torch.rand(4, 1, 7, 7), torch.zeros(4, dtype=torch.long), batch_size=0)


def _reference_api_module():
    """A stand-in with the reference ``autoattack`` package's API (constructor keywords,
    ``bs=``, x_adv-only return, warnings written as "Warning: ..." lines to ``log_path``),
    running pyautoattack's attacks underneath."""
    import types

    import pyautoattack

    class AutoAttack:
        def __init__(self, model, norm="Linf", eps=.3, seed=None, verbose=True,
                     attacks_to_run=(), version="standard", is_tf_model=False, device="cuda",
                     log_path=None):
            self.inner = pyautoattack.AutoAttack(model, attacks=list(attacks_to_run) or None,
                                                 device=device, eps=eps, norm=norm, seed=seed,
                                                 version=version)
            self.log_path = log_path
            for name in ("apgd", "apgd_targeted", "fab", "square"):
                setattr(self, name, getattr(self.inner, name))

        @property
        def attacks_to_run(self):
            return self.inner.attacks_to_run

        @attacks_to_run.setter
        def attacks_to_run(self, value):
            self.inner.attacks_to_run = value

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
            with capture_autoattack_warnings() as found:
                x_adv, y_adv = self.inner.run_standard_evaluation(x_orig, y_orig, batch_size=bs)
            with open(self.log_path, "a") as f:
                f.writelines(f"Warning: {m}\n" for m in found)
            return (x_adv, y_adv) if return_labels else x_adv

    return types.SimpleNamespace(AutoAttack=AutoAttack, __version__="0.1-reference-api")


def test_reference_package_api_gives_the_same_result(trained, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "autoattack", _reference_api_module())
    model, x, y = trained
    kw = dict(eps=3 / 255, attacks=["apgd-ce", "apgd-t"], seed=0, **FAST)
    ref = AutoAttackAdapter(model, backend="auto", **kw)
    assert ref.backend == "autoattack"  # preferred when installed
    a = ref.run(x, y, batch_size=16)
    b = AutoAttackAdapter(model, backend="pyautoattack", **kw).run(x, y, batch_size=16)
    assert torch.equal(a.robust, b.robust) and torch.equal(a.x_adv, b.x_adv)
    assert a.backend_version == "0.1-reference-api"
    soft = AutoAttackAdapter(nn.Sequential(model, nn.Softmax(dim=1)), backend="autoattack",
                             **kw).run(x[:8], y[:8], batch_size=8)
    assert sum("probability distribution" in w for w in soft.warnings) == 1


def test_autoattack_model_checks_run_once_per_evaluation(trained, monkeypatch):
    import pyautoattack.checks as aa_checks
    model, x, y = trained
    calls = []
    real = aa_checks.check_dynamic
    monkeypatch.setattr(aa_checks, "check_dynamic",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    result = AutoAttackAdapter(model, eps=4 / 255, attacks=["apgd-ce", "apgd-t"], seed=0,
                               **FAST).run(x[:32], y[:32], batch_size=8)
    assert len(calls) == 1
    # The skipped repeats change nothing: the same flags as with checks on every batch.
    monkeypatch.setattr("advvit.autoattack_adapter._MODEL_CHECKS", ())
    again = AutoAttackAdapter(model, eps=4 / 255, attacks=["apgd-ce", "apgd-t"], seed=0,
                              **FAST).run(x[:32], y[:32], batch_size=8)
    assert torch.equal(result.robust, again.robust)
    assert len(calls) > 2


class DetachesInput(nn.Module):
    """A forward that cuts its input from the graph: no gradient attack can run on it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, t):
        return self.inner(t.detach())


def test_attacks_without_a_gradient_fail_and_the_black_box_attack_still_runs(trained):
    model, x, y = trained
    r = AutoAttackAdapter(DetachesInput(model), eps=0.1, version="custom",
                          attacks=["apgd-ce", "fab", "square"], n_iter=5, n_restarts=1,
                          n_queries=100, seed=0).run(x, y, batch_size=16)
    apgd, fab, square = r.attacks
    # APGD raises in autograd, FAB on a None gradient: both are recorded, not raised
    for failed in (apgd, fab):
        assert failed.status == "failed" and failed.n_attacked == 0
        assert "no gradient with respect to its input" in failed.reason
        assert torch.equal(failed.robust, r.clean)  # nothing counted as broken by them
    assert [a.name for a in r.failed] == ["apgd-ce", "fab"]
    assert square.status == "ran" and square.n_attacked == int(r.clean.sum())
    assert r.robust_accuracy < r.clean_accuracy  # Square needs no gradient and breaks some
    assert set(b for b in r.broken_by if b not in (None, "clean")) == {"square"}
    # the same Square run on the same model alone gives the same examples broken
    alone = AutoAttackAdapter(model, eps=0.1, version="custom", attacks=["square"],
                              n_restarts=1, n_queries=100, seed=0).run(x, y, batch_size=16)
    assert torch.equal(alone.robust, r.robust)


def test_eps_zero_attacks_nothing(trained, monkeypatch):
    model, x, y = trained

    def no_attack(*args, **kwargs):
        raise AssertionError("an attack ran at eps 0")

    monkeypatch.setattr(AutoAttackAdapter, "_run_one_batch", no_attack)
    r = AutoAttackAdapter(model, eps=0.0, version="standard", seed=0).run(x, y, batch_size=16)
    assert torch.equal(r.robust, r.clean) and 0 < r.clean_accuracy < 1
    assert [(a.status, a.seconds, a.n_attacked) for a in r.attacks] == [("skipped", 0.0, 0)] * 4


@pytest.mark.slow
def test_rand_version_equals_calling_autoattack_directly(trained):
    """AutoAttack's version for randomized models: APGD-CE and APGD-DLR with 20-sample EOT."""
    from pyautoattack import AutoAttack

    model, x, y = trained
    x, y = x[:12], y[:12]
    eps = 8 / 255
    result = AutoAttackAdapter(model, eps=eps, version="rand", seed=0,
                               backend="pyautoattack").run(x, y, batch_size=5)
    assert [a.name for a in result.attacks] == ["apgd-ce", "apgd-dlr"]
    assert result.attack_settings["apgd-ce"] == {"n_iter": 100, "n_restarts": 1, "eot_iter": 20}
    direct = AutoAttack(model, eps=eps, norm="Linf", seed=0, version="rand")
    x_adv, y_adv = direct.run_standard_evaluation(x, y, batch_size=5)
    assert torch.equal(result.robust, y_adv == y)
    assert torch.equal(result.x_adv, x_adv)
    assert result.robust_accuracy < result.clean_accuracy


def test_fab_keeps_its_restarts_after_fab_t(trained):
    """AutoAttack's FAB-T sets fab.n_restarts to 1 and leaves it; FAB after it (the next batch or
    the next run) must still run, and report, the restarts it was given."""
    model, x, y = trained
    adapter = AutoAttackAdapter(model, eps=0.01, version="custom", attacks=["fab-t", "fab"],
                                n_iter=5, n_restarts=3, seed=0)
    seen = []
    fab = adapter._aa.fab
    perturb = fab.perturb

    def recording(*args, **kwargs):
        seen.append((fab.targeted, fab.n_restarts))
        return perturb(*args, **kwargs)

    fab.perturb = recording
    result = adapter.run(x[:8], y[:8], batch_size=4)
    adapter.run(x[:8], y[:8], batch_size=4)
    assert {r for targeted, r in seen if not targeted} == {3}
    assert {r for targeted, r in seen if targeted} == {1}
    assert result.attack_settings["fab"]["n_restarts"] == 3
