"""The one evaluation runner (advvit.robustness) with advvit.attacks' PGD / FGSM plugged in."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advvit  # noqa: F401
from advvit import robustness as R

ROOT = Path(__file__).resolve().parents[1]

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


def _pgd(model):
    return R.torch_attack_suite(model, "pgd", eps=0.1, steps=1, seed=5)


def test_a_state_file_is_never_resumed_for_changed_weights(trained, tmp_path):
    model, x, y = trained
    state = tmp_path / "state.json"
    R.run_attacks(model, x, y, _pgd(model), batch_size=8, state_path=state, stop_after_batches=1)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[1].bias[0] += 1e-3  # one weight moved: another model
    before = state.read_bytes()
    with pytest.raises(R.StateMismatchError, match="written for other model weights.*delete it"):
        R.run_attacks(changed, x, y, _pgd(changed), batch_size=8, state_path=state)
    assert state.read_bytes() == before  # kept as it was
    R.run_attacks(model, x, y, _pgd(model), batch_size=8, state_path=state)  # its own model resumes
    saved = json.loads(state.read_text())
    saved["config"].pop("model")  # as written before states recorded the model
    state.write_text(json.dumps(saved))
    with pytest.raises(R.StateMismatchError, match="predates state files recording the model"):
        R.run_attacks(model, x, y, _pgd(model), batch_size=8, state_path=state)


def test_a_state_file_in_use_is_refused_and_a_killed_runs_lock_taken_over(trained, tmp_path):
    model, x, y = trained
    state = tmp_path / "state.json"
    refused = []

    def second_run(attack, batch, n_batches):
        if batch == 0:  # the first run holds the state file now
            with pytest.raises(R.StateMismatchError) as e:
                R.run_attacks(model, x, y, _pgd(model), batch_size=8, state_path=state)
            refused.append(str(e.value))

    first = R.run_attacks(model, x, y, _pgd(model), batch_size=8, state_path=state,
                          on_batch=second_run)
    (msg,) = refused
    assert f"state file {state} is in use by another evaluation (pid {os.getpid()}" in msg
    assert "give another state path" in msg
    # A run killed while it held the lock blocks nothing.
    hold = ("import sys, time\nfrom advvit import io\nio.lock_file(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, f"{state}.lock"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = R.run_attacks(model, x, y, _pgd(model), batch_size=8, state_path=state)
    assert torch.equal(again.robust, first.robust)


def test_a_state_path_that_is_no_state_file_is_refused_and_kept(trained, tmp_path):
    model, x, y = trained
    for name, content in (("random.bin", os.urandom(512)), ("notes.json", b'{"a": 1}'),
                          ("text.txt", "ça".encode("latin-1"))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(R.StateMismatchError, match="is not an advvit evaluation state file"):
            R.run_attacks(model, x, y, _pgd(model), batch_size=8, state_path=path)
        assert path.read_bytes() == content


def test_low_precision_breaks_count_only_when_they_fool_the_fp32_model(trained):
    # An attack whose labels claim every example broken while it returns the clean inputs:
    # the fp32 model still classifies them right, so none is broken.
    model, x, y = trained

    def claims_all_broken(xb, yb):
        return xb, (yb + 1) % 10

    suite = R.AttackSuite((R.BatchAttack("liar", claims_all_broken),), 0.1, "linf", 0, "custom")
    out = R.run_attacks(model, x, y, suite, batch_size=16, precision="bf16")
    assert torch.equal(out.robust, out.clean) and out.precision == "bf16"
    assert out.attacks[0].false_breaks == int(out.clean.sum()) > 0
    trusting = R.run_attacks(model, x, y, suite, batch_size=16)
    assert trusting.robust_accuracy == 0 and trusting.attacks[0].false_breaks == 0


def test_a_bf16_attack_breaks_only_what_fools_the_fp32_model(trained, tmp_path):
    from advvit.attack_names import attack_spec
    from advvit.suites import run_attack

    model, x, y = trained
    spec = attack_spec("pgd", steps=5)
    out = run_attack(model, x, y, spec, eps=0.1, batch_size=16, keep_adv=True, amp="bf16")
    assert out.precision == "bf16" and 0 < out.robust_accuracy < out.clean_accuracy
    with torch.no_grad():
        fooled = model(out.x_adv).argmax(1) != y
    assert torch.equal(fooled, ~out.robust)  # each break fools fp32; x stands where none
    assert (out.x_adv - x).abs().max() <= 0.1 + 1e-6
    # A state file of the fp32 evaluation is not resumed by the bf16 one.
    state = tmp_path / "state.json"
    run_attack(model, x, y, spec, eps=0.1, batch_size=16, state_path=state)
    with pytest.raises(R.StateMismatchError, match="precision"):
        run_attack(model, x, y, spec, eps=0.1, batch_size=16, state_path=state, amp="bf16")
