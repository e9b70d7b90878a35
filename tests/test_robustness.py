"""The one evaluation runner (advvit.robustness) with advvit.attacks' PGD / FGSM plugged in."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advvit  # noqa: F401
from advvit import robustness as R

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """An MLP on 10 classes of noisy 1x8x8 prototypes: ~all clean examples right, PGD breaks
    some at eps 0.1."""
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 1, 8, 8, generator=g) * 0.6 + 0.2
    y = torch.randint(0, 10, (640,), generator=g)
    x = (protos[y] + 0.1 * torch.randn(640, 1, 8, 8, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(x[:600]), y[:600])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[600:], y[600:]


def test_pgd_resumed_equals_uninterrupted(trained, tmp_path):
    model, x, y = trained
    suite = R.torch_attack_suite(model, "pgd", eps=0.1, steps=3, restarts=2, seed=5)
    full = R.run_attacks(model, x, y, suite, batch_size=8)
    assert 0 < full.robust_accuracy < full.clean_accuracy
    state = tmp_path / "state.json"
    part = R.run_attacks(model, x, y, suite, batch_size=8, state_path=state,
                         stop_after_batches=2)
    assert not part.complete and json.loads(state.read_text())["current"]["batches_done"] == 2
    resumed = R.run_attacks(model, x, y, suite, batch_size=8, state_path=state)
    assert torch.equal(resumed.robust, full.robust) and resumed.broken_by == full.broken_by
    (a,) = resumed.attacks
    assert a.name == "pgd" and a.n_attacked == int(full.clean.sum())
    assert full.attack_settings == {"pgd": {"steps": 3, "restarts": 2, "step_size": None,
                                            "random_init": True}}


def test_restarts_only_add_broken_examples_and_the_callers_rng_is_left_alone(trained):
    model, x, y = trained
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    one = R.run_attacks(model, x, y, R.torch_attack_suite(model, "pgd", eps=0.1, steps=2),
                        batch_size=16)
    assert torch.equal(torch.random.get_rng_state(), before)
    three = R.run_attacks(model, x, y, R.torch_attack_suite(model, "pgd", eps=0.1, steps=2,
                                                           restarts=3), batch_size=16)
    # the first restart draws what a single one does (same seed), the others add to it
    assert not (three.robust & ~one.robust).any()
    assert three.robust.sum() < one.robust.sum()


def test_fgsm_adversarial_examples_are_what_they_claim(trained):
    model, x, y = trained
    r = R.run_attacks(model, x, y, R.torch_attack_suite(model, "fgsm", eps=0.1), batch_size=16)
    assert (r.x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert torch.equal(model(r.x_adv).argmax(1) == y, r.robust)


def test_an_error_that_is_not_a_missing_gradient_is_raised(trained):
    model, x, y = trained

    def broken(xb, yb):
        raise RuntimeError("a bug in the attack")

    suite = R.AttackSuite((R.BatchAttack("broken", broken),), 0.1, "linf", 0, "custom")
    with pytest.raises(RuntimeError, match="a bug in the attack"):
        R.run_attacks(model, x, y, suite)


def test_l2_eps_beyond_the_input_diagonal_is_refused(trained):
    model, x, y = trained  # 1x8x8: the diagonal is 8
    R.run_attacks(model, x[:4], y[:4], R.torch_attack_suite(model, "fgsm", eps=8.0, norm="l2"))
    with pytest.raises(ValueError, match="above 8, the L2 diagonal of a 1x8x8 input"):
        R.run_attacks(model, x, y, R.torch_attack_suite(model, "fgsm", eps=8.5, norm="l2"))


def test_submodule_modes_are_restored(trained):
    model, x, y = trained
    wrapped = nn.Sequential(nn.Dropout(0.5), model).eval()
    wrapped[0].train()  # a submodule in another mode than its parent
    R.run_attacks(wrapped, x, y, R.torch_attack_suite(wrapped, "fgsm", eps=0.1))
    assert wrapped[0].training and not wrapped.training and not model.training


def test_merge_keeps_a_shards_failure(trained):
    model, x, y = trained
    suite = R.torch_attack_suite(model, "fgsm", eps=0.1)
    parts = []
    for rank in range(2):
        pos = list(range(rank, len(y), 2))
        part = R.run_attacks(model, x[pos], y[pos], suite, batch_size=8)
        part.positions = pos
        parts.append(part)
    parts[1].attacks[0].status, parts[1].attacks[0].reason = "failed", "no gradient"
    merged = R.merge_outcomes(parts)
    whole = R.run_attacks(model, x, y, suite, batch_size=8)
    assert torch.equal(merged.robust, whole.robust) and merged.broken_by == whole.broken_by
    (a,) = merged.attacks
    assert (a.status, a.reason) == ("failed", "no gradient")
    assert a.n_attacked == whole.attacks[0].n_attacked
