"""Sanity checks: canary models trip them, a healthy trained model does not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advvit  # noqa: F401
from advvit import checks
from advvit.autoattack_adapter import AutoAttackAdapter
from advvit.attack_names import parse_attack


pytestmark = pytest.mark.usefixtures("one_thread")


def _separable(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of 1x8x8 images: a fixed random prototype per class plus small noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    y = torch.randint(0, 10, (n,), generator=g)
    x = (protos[y] + 0.05 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def healthy():
    torch.manual_seed(0)
    x, y = _separable(600)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    xt, yt = _separable(32, seed=1)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.9
    return model, xt, yt


class Quantized(nn.Module):
    """Gradient masking canary: rounds inputs to 8 bits; round() has zero gradient."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


class Noisy(nn.Module):
    """Randomized canary: Gaussian noise on the input at every call, in eval mode too."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


class NaNGrad(nn.Module):
    """A forward whose value is fine but whose input gradient is NaN (sqrt at 0)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0 * torch.sqrt(x - x.detach()).sum()


def _codes(flags):
    return {f.code for f in flags}


def test_healthy_model_raises_no_flag(healthy):
    model, x, y = healthy
    assert checks.run_model_checks(model, x, y) == []


def test_masked_gradients_canary(healthy):
    model, x, y = healthy
    canary = Quantized(model)
    assert _codes(checks.run_model_checks(canary, x, y)) == {"zero_gradients"}
    # AutoAttack agrees: APGD-T (its zero-gradient check runs with DLR losses) finds no
    # gradient, and Square (no gradients) breaks what the APGD attacks cannot.
    r = AutoAttackAdapter(canary, eps=0.25, version="custom",
                          attacks=["apgd-ce", "apgd-t", "square"],
                          n_iter=20, n_restarts=1, n_queries=300, seed=0).run(x, y, batch_size=32)
    codes = _codes(checks.check_autoattack_warnings(r.warnings))
    assert "aa_zero_gradients" in codes
    steps = [(a.name, a.robust_accuracy) for a in r.attacks]
    flag = checks.check_black_box_beats_white_box(steps)
    assert flag is not None and "square" in flag.detail
    # the healthy model under the same attacks gives no such flag
    h = AutoAttackAdapter(model, eps=0.25, version="custom", attacks=["apgd-ce", "square"],
                          n_iter=20, n_restarts=1, n_queries=300, seed=0).run(x, y, batch_size=32)
    assert checks.check_black_box_beats_white_box(
        [(a.name, a.robust_accuracy) for a in h.attacks]) is None


def test_softmax_canary(healthy):
    model, x, y = healthy
    canary = nn.Sequential(model, nn.Softmax(dim=1))
    assert _codes(checks.run_model_checks(canary, x, y)) == {"softmax_output"}
    r = AutoAttackAdapter(canary, eps=0.05, version="custom", attacks=["apgd-ce"], n_iter=5,
                          n_restarts=1, seed=0).run(x, y, batch_size=32)
    assert "aa_softmax_output" in _codes(checks.check_autoattack_warnings(r.warnings))


@pytest.mark.slow
def test_randomized_canary(healthy):
    model, x, y = healthy
    canary = Noisy(model)
    flags = {f.code: f for f in checks.run_model_checks(canary, x, y)}
    assert "randomized" in flags
    r = AutoAttackAdapter(canary, eps=0.05, version="custom", attacks=["apgd-ce"], n_iter=5,
                          n_restarts=1, seed=0).run(x, y, batch_size=32)
    aa_flags = {f.code: f for f in checks.check_autoattack_warnings(r.warnings)}
    assert "aa_randomized" in aa_flags
    # the advice names an attack the evaluation CLI runs: AutoAttack's EOT version
    for flag in (flags["randomized"], aa_flags["aa_randomized"]):
        assert "--attack autoattack-rand" in flag.message
    assert parse_attack("autoattack-rand").version == "rand"
    rand = AutoAttackAdapter(canary, eps=0.05, version="rand", seed=0).run(x, y, batch_size=32)
    assert [a.name for a in rand.attacks] == ["apgd-ce", "apgd-dlr"]
    assert rand.attack_settings["apgd-ce"]["eot_iter"] == 20
    # AutoAttack's rand version does not run its randomness check, which would only repeat
    # that the model is randomized
    assert "aa_randomized" not in _codes(checks.check_autoattack_warnings(rand.warnings))


def test_dropout_left_on_is_not_randomized_in_eval_mode(healthy):
    model, x, y = healthy
    with_dropout = nn.Sequential(nn.Dropout(0.5), model).train()
    assert checks.check_randomized(with_dropout, x) is None  # the check evaluates in eval mode
    assert with_dropout.training  # and restores the mode


def test_nan_gradient_canary(healthy):
    model, x, y = healthy
    grad = checks.input_margin_gradient(NaNGrad(model), x, y)
    flag = checks.check_nonfinite_gradients(grad)
    assert flag is not None and f"{len(x)} of {len(x)}" in flag.detail


def test_input_gradient_leaves_parameters_alone(healthy):
    model, x, y = healthy
    grad = checks.input_margin_gradient(model, x, y)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_robust_rising_with_eps():
    assert checks.check_robust_rises_with_eps([(0.0, 0.9), (0.01, 0.5), (0.03, 0.1)]) is None
    flag = checks.check_robust_rises_with_eps([(0.03, 0.3), (0.0, 0.9), (0.01, 0.2)])
    assert flag is not None and flag.affects == ("0.03",)
    assert checks.check_robust_rises_with_eps([(0.01, 0.2), (0.03, 0.21)], tol=0.02) is None


def test_black_box_rule_needs_a_white_box_before_it():
    # Square first (AutoAttack's 'plus' order runs it mid-way): its drop alone is not a finding
    assert checks.check_black_box_beats_white_box([("square", 0.4), ("apgd-ce", 0.3)]) is None
    assert checks.check_black_box_beats_white_box(
        [("apgd-ce", 0.5), ("apgd-t", 0.45), ("square", 0.449)]) is None  # within 0.2%
    assert checks.check_black_box_beats_white_box(
        [("apgd-ce", 0.5), ("square", 0.40)]) is not None


def test_robust_above_clean():
    assert checks.check_robust_above_clean(0.8, 0.8) is None
    flag = checks.check_robust_above_clean(0.5, 0.6, attack="pgd")
    assert flag is not None and flag.affects == ("pgd",)


def test_autoattack_messages_become_flags():
    flags = checks.check_autoattack_warnings([
        "there are 3 points with zero gradient! This might lead to unreliable evaluation",
        "something new",
    ])
    assert [f.code for f in flags] == ["aa_zero_gradients", "aa_other"]
    assert "something new" in str(flags[1])


class Detached(nn.Module):
    """A forward that cuts its input from the autograd graph."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.detach())


def test_missing_input_gradient_tells_a_cut_graph_from_a_zero_gradient(healthy):
    model, x, y = healthy
    assert checks.missing_input_gradient(model, x) is None
    assert checks.missing_input_gradient(Quantized(model), x) is None  # connected, just zero
    reason = checks.missing_input_gradient(Detached(model), x)
    assert reason is not None and "x.detach()" in reason
    # with the weights frozen as well nothing is in the graph: still a reason, no exception
    frozen = Detached(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    try:
        assert checks.missing_input_gradient(frozen, x) is not None
        grad = checks.input_margin_gradient(frozen, x, y)
        assert checks.check_zero_gradients(grad) is not None
    finally:
        for p in frozen.parameters():
            p.requires_grad_(True)


def test_failed_attacks_flag_gradient_masking():
    assert checks.check_failed_attacks([]) is None
    flag = checks.check_failed_attacks([("apgd-ce", "no gradient")])
    assert flag.code in checks.GRADIENT_MASKING and "apgd-ce: no gradient" in flag.detail
    assert flag.affects == (checks.ALL_ROBUST,)
    # one reason shared by several attacks is said once
    flag = checks.check_failed_attacks([("apgd-ce", "cut"), ("apgd-t", "cut"), ("fab-t", "none")])
    assert flag.detail == "apgd-ce, apgd-t: cut; fab-t: none"
