"""Attacks checked against analytic answers, invariants, and each other."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from advvit.attacks import fgsm, pgd


class Linear(nn.Module):
    """A linear classifier on flattened pixels: its optimal perturbations are known."""

    def __init__(self, shape=(1, 4, 4), classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = int(torch.tensor(shape).prod())
        self.fc = nn.Linear(d, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, d, generator=g))
            self.fc.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _inputs(n=8, shape=(1, 4, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    # Away from 0 and 1 so that clipping to the image box does not interfere.
    x = 0.25 + 0.5 * torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    return x.grad


def test_fgsm_linf_equals_closed_form_on_linear_model():
    model, (x, y) = Linear(), _inputs()
    eps = 0.1
    x_adv = fgsm(model, x, y, eps=eps, random_init=False)
    expected = x + eps * _input_grad(model, x, y).sign()
    torch.testing.assert_close(x_adv, expected)


def test_fgsm_linf_is_the_optimal_first_order_perturbation():
    # For a linear model and a 2-class logit margin, the loss is monotone in w.x, so the
    # Linf-optimal perturbation is eps * sign(w_wrong - w_true): check it directly.
    model = Linear(classes=2)
    x, _ = _inputs()
    y = torch.zeros(x.shape[0], dtype=torch.long)
    eps = 0.05
    w = model.fc.weight.detach()
    optimum = x + eps * (w[1] - w[0]).sign().view(1, *x.shape[1:])
    torch.testing.assert_close(fgsm(model, x, y, eps=eps, random_init=False), optimum)


def test_fgsm_l2_is_along_the_gradient_with_norm_eps():
    model, (x, y) = Linear(), _inputs()
    eps = 0.3
    delta = fgsm(model, x, y, eps=eps, norm="l2", random_init=False) - x
    grad = _input_grad(model, x, y)
    norms = delta.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, eps))
    cos = F.cosine_similarity(delta.flatten(1), grad.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.0, 0.6), steps=st.integers(1, 4), norm=st.sampled_from(["linf", "l2"]),
       seed=st.integers(0, 1000), random_init=st.booleans())
def test_ball_and_box_constraints(eps, steps, norm, seed, random_init):
    torch.manual_seed(seed)
    model = Linear(seed=seed)
    x = torch.rand(6, 1, 4, 4)  # pixels touch 0 and 1: clipping matters here
    y = torch.randint(0, 3, (6,))
    x_adv = pgd(model, x, y, eps=eps, steps=steps, norm=norm, random_init=random_init)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()


def test_more_pgd_steps_never_end_with_lower_loss_on_a_convex_case():
    # Two-class cross-entropy of a linear model is convex and monotone in one linear margin:
    # every PGD step moves along the same improving direction, so more steps can only add loss.
    model, (x, y) = Linear(classes=2), _inputs(n=32)
    y = y.clamp(max=1)
    eps = 0.1

    def loss(xa):
        return F.cross_entropy(model(xa), y, reduction="none")

    one = loss(pgd(model, x, y, eps=eps, steps=1, random_init=False))
    many = loss(pgd(model, x, y, eps=eps, steps=10, random_init=False))
    assert (many >= one - 1e-5).all()


def test_pgd_reaches_the_exact_linf_maximum_found_by_enumeration():
    # Cross-entropy of a linear model is convex in x, so its maximum over the Linf ball is at a
    # vertex: enumerate all 2^12 of them for the exact answer and hold the attacks against it.
    shape = (1, 3, 4)
    model, (x, y) = Linear(shape=shape), _inputs(n=16, shape=shape)
    eps = 0.05
    signs = torch.tensor([[(v >> i) & 1 for i in range(12)] for v in range(2 ** 12)],
                         dtype=torch.float32).mul(2).sub(1)

    def loss(xa):
        return F.cross_entropy(model(xa), y, reduction="none")

    with torch.no_grad():
        vertices = x.flatten(1)[:, None, :] + eps * signs[None]  # (n, 4096, 12)
        logits = model.fc(vertices)
        best = F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, 4096),
                               reduction="none").amax(1)
    clean, one = loss(x), loss(fgsm(model, x, y, eps=eps, random_init=False))
    many = loss(pgd(model, x, y, eps=eps, steps=20, step_size=eps / 4))
    assert (many <= best + 1e-4).all() and (one <= best + 1e-4).all()
    # PGD closes at least 99% of the gap between the clean loss and the true maximum.
    assert ((many - clean) >= 0.99 * (best - clean)).all()
    assert (one > clean).all()


def test_targeted_attack_moves_towards_the_target():
    model, (x, _) = Linear(), _inputs(n=16)
    target = torch.full((16,), 2, dtype=torch.long)
    before = F.cross_entropy(model(x), target).item()
    x_adv = pgd(model, x, target, eps=0.2, steps=5, targeted=True)
    assert F.cross_entropy(model(x_adv), target).item() < before


class BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


def test_attack_leaves_grads_requires_grad_and_mode_as_they_were():
    model = BN().train()
    model.fc.weight.requires_grad_(False)
    x, y = _inputs()
    F.cross_entropy(model(x), y).backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = model.bn.running_mean.clone()
    model.bn.eval()  # a mixed mode must come back exactly

    pgd(model, x, y, eps=0.1, steps=3)

    assert model.training and not model.bn.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_mean, stats, rtol=0, atol=0)


def test_attack_restores_state_when_it_raises():
    model = BN().train()

    def boom(logits, y):
        raise RuntimeError("loss failed")

    x, y = _inputs()
    with pytest.raises(RuntimeError, match="loss failed"):
        pgd(model, x, y, eps=0.1, steps=2, loss_fn=boom)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_train_mode_attack_is_honoured():
    seen = []

    class Probe(Linear):
        def forward(self, x):
            seen.append(self.training)
            return super().forward(x)

    model = Probe().eval()
    x, y = _inputs()
    pgd(model, x, y, eps=0.1, steps=2, model_mode="train")
    assert seen == [True, True] and not model.training


def test_train_mode_attack_leaves_batchnorm_statistics_alone():
    model = BN().eval()
    x, y = _inputs()
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    pgd(model, x, y, eps=0.1, steps=3, model_mode="train")
    for k, v in model.bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not model.training


def test_on_step_called_once_per_iteration_and_eps_zero_is_identity():
    model, (x, y) = Linear(), _inputs()
    calls = []
    pgd(model, x, y, eps=0.1, steps=7, on_step=lambda: calls.append(1))
    assert len(calls) == 7
    calls.clear()
    out = pgd(model, x, y, eps=0.0, steps=3, on_step=lambda: calls.append(1))
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    assert calls == []


@pytest.mark.parametrize("kwargs, name", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=0.1, steps=0), "steps"),
    (dict(eps=0.1, norm="l1"), "norm"),
    (dict(eps=0.1, step_size=0.0), "step_size"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    model, (x, y) = Linear(), _inputs()
    with pytest.raises(ValueError, match=name):
        pgd(model, x, y, **kwargs)


def test_inputs_outside_the_unit_box_are_refused():
    model, (x, y) = Linear(), _inputs()
    with pytest.raises(ValueError, match=r"x must hold pixels in \[0, 1\]"):
        pgd(model, (x - 0.5) / 0.25, y, eps=0.1)


@pytest.mark.slow
def test_import_stays_light():
    code = ("import sys, advvit.attacks, advvit.losses, advvit.schedules; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('timm', 'torch_xla', 'tensorboard', 'torchvision', 'yaml')]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
