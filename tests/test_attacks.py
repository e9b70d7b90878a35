"""Attacks checked against analytic answers, invariants, and each other."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from advvit.attacks import fgsm, max_eps, pgd, project_l1


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


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.0, 0.6), steps=st.integers(1, 4),
       norm=st.sampled_from(["linf", "l2", "l1"]),
       seed=st.integers(0, 1000), random_init=st.booleans())
def test_ball_and_box_constraints(eps, steps, norm, seed, random_init):
    torch.manual_seed(seed)
    model = Linear(seed=seed)
    x = torch.rand(6, 1, 4, 4)  # pixels touch 0 and 1: clipping matters here
    y = torch.randint(0, 3, (6,))
    x_adv = pgd(model, x, y, eps=eps, steps=steps, norm=norm, random_init=random_init)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1),
            "l1": delta.abs().sum(1)}[norm]
    assert (size <= eps + 1e-5).all()


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.0, 40.0), steps=st.integers(1, 3), seed=st.integers(0, 1000),
       random_init=st.booleans(), binary=st.booleans())
def test_l1_attack_never_leaves_the_ball_or_the_box(eps, steps, seed, random_init, binary):
    # Radii up to most of the 48-pixel box's L1 diameter, and pixels at 0 and 1, where the box
    # and the ball cut each other most.
    torch.manual_seed(seed)
    shape = (3, 4, 4)
    model = Linear(shape=shape, seed=seed)
    x = torch.rand(6, *shape)
    if binary:
        x = x.round()
    y = torch.randint(0, 3, (6,))
    x_adv = pgd(model, x, y, eps=eps, steps=steps, norm="l1", random_init=random_init)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # In float64, up to the rounding of x + delta to float32 (2^-24 a pixel).
    size = (x_adv.double() - x.double()).flatten(1).abs().sum(1)
    assert (size <= eps * (1 + 1e-9) + 48 * 2.0 ** -24).all()


def _l1_projection_by_bisection(z, eps, x):
    """The projection onto {d : ||d||_1 <= eps, x + d in [0, 1]} by bisection on its threshold:
    slow, and plainly right."""
    z, x = z.double().flatten(1), x.double().flatten(1)
    a, cap = z.abs(), torch.where(z > 0, 1 - x, x)
    out = torch.minimum(a, cap)
    for i in range(z.shape[0]):
        if out[i].sum() <= eps:
            continue
        lo, hi = 0.0, a[i].max().item()
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if torch.minimum((a[i] - mid).clamp_min(0), cap[i]).sum() > eps \
                else (lo, mid)
        out[i] = torch.minimum((a[i] - hi).clamp_min(0), cap[i])
    return z.sign() * out


def test_l1_projection_is_the_exact_projection_onto_ball_and_box():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        d = int(torch.randint(1, 80, (1,), generator=g))
        x = torch.rand(5, d, generator=g)
        if trial % 3 == 0:
            x = x.round()
        z = torch.randn(5, d, generator=g) * 3 * float(torch.rand(1, generator=g))
        eps = float(torch.rand(1, generator=g)) * d / 2 + 1e-3
        torch.testing.assert_close(project_l1(z, eps, x).double(),
                                   _l1_projection_by_bisection(z, eps, x), rtol=0, atol=1e-6)
    z = torch.randn(4, 10, generator=g) * 5
    torch.testing.assert_close(project_l1(z, 1.0).abs().sum(1), torch.ones(4))  # no box
    assert project_l1(z, 1e3).equal(z)


def test_l1_projection_equals_autoattacks_on_image_sized_inputs():
    # On inputs of a few pixels AutoAttack's binary search can stop one kink short (measured:
    # 10 of 300 random cases with 1 to 6 pixels); on image-sized ones the two agree.
    from pyautoattack.autopgd_base import L1_projection
    g = torch.Generator().manual_seed(1)
    for trial in range(10):
        x = torch.rand(4, 3, 16, 16, generator=g)
        if trial % 2:
            x = x.round()
        z = torch.randn(x.shape, generator=g) * 0.5
        eps = 1.0 + 20.0 * trial
        torch.testing.assert_close(project_l1(z, eps, x), z + L1_projection(x, z, eps),
                                   rtol=0, atol=1e-5)


def _best_l1_perturbation(v, x, eps):
    """The maximiser of v . d over ||d||_1 <= eps, x + d in [0, 1]: the budget goes to the
    coordinates of largest |v|, each moved as far as the box lets it, in that order."""
    xf = x.flatten(1)
    room = torch.where(v > 0, 1 - xf, xf)
    order = v.abs().argsort(descending=True)
    out = torch.zeros_like(xf)
    for i in range(xf.shape[0]):
        left = eps
        for j in order.tolist():
            take = min(left, room[i, j].item())
            out[i, j], left = take * v[j].sign(), left - take
    return out.view_as(x)


@pytest.mark.parametrize("eps", [0.3, 1.0, 3.0])
def test_pgd_l1_reaches_the_closed_form_optimum_of_a_linear_objective(eps):
    shape = (1, 6, 8)
    g = torch.Generator().manual_seed(2)
    model = Linear(shape=shape, classes=1)
    w = model.fc.weight.detach()[0]
    x = torch.rand(8, *shape, generator=g)
    best = _best_l1_perturbation(w, x, eps)
    steps = 100
    x_adv = pgd(model, x, torch.zeros(8, dtype=torch.long), eps=eps, steps=steps, norm="l1",
                random_init=False, loss_fn=lambda logits, _: logits.sum())
    delta = x_adv - x
    gain, best_gain = delta.flatten(1) @ w, best.flatten(1) @ w
    assert (gain <= best_gain + 1e-5).all()  # above it, the attack would have left ball or box
    # Fixed-size steps end within two steps of the optimum (the projection takes every step's
    # overshoot evenly from all moved pixels).
    alpha = 1.5 * eps / steps
    assert ((delta - best).flatten(1).abs().sum(1) <= 2 * alpha).all()


def test_fgsm_l1_from_the_clean_point_is_the_closed_form_when_one_pixel_takes_eps():
    # Largest |w| on one pixel with room for all of eps: the one step must put eps there.
    shape = (1, 6, 8)
    model = Linear(shape=shape, classes=1)
    w = model.fc.weight.detach()[0]
    x = torch.full((2, *shape), 0.5)
    eps = 0.4
    x_adv = fgsm(model, x, torch.zeros(2, dtype=torch.long), eps=eps, norm="l1",
                 random_init=False, loss_fn=lambda logits, _: logits.sum())
    torch.testing.assert_close(x_adv - x, _best_l1_perturbation(w, x, eps))


def test_pgd_l1_and_autoattacks_apgd_l1_break_the_same_linear_examples():
    # Two classes and a linear model: the largest margin an L1 perturbation inside the box can
    # take off is known in closed form, so which examples can be broken is known. Examples
    # within 25% of the budget's reach are left out: there both attacks stop short of exact.
    from pyautoattack.autopgd_base import APGDAttack
    shape, n, eps = (1, 8, 8), 400, 1.0
    model = Linear(shape=shape, classes=2, seed=3).eval()
    with torch.no_grad():
        model.fc.bias.zero_()
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    w = model.fc.weight.detach()
    margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, (1 - y)[:, None])[:, 0]
    reach = torch.stack([(_best_l1_perturbation(w[1 - c] - w[c], x[i:i + 1], eps).flatten()
                          * (w[1 - c] - w[c])).sum() for i, c in enumerate(y.tolist())])
    keep = (reach > 1.25 * margin) | (reach < 0.8 * margin)
    x, y, breakable = x[keep], y[keep], (reach > margin)[keep]
    assert breakable.sum() >= 10 and (~breakable).sum() >= 10
    # From the clean point: the random start is held to the ball and the box above.
    ours = pgd(model, x, y, eps=eps, norm="l1", steps=100, random_init=False)
    apgd = APGDAttack(model, norm="L1", eps=eps, n_iter=100, n_restarts=1, seed=0, device="cpu")
    theirs = apgd.perturb(x, y)
    with torch.no_grad():
        assert torch.equal(model(ours).argmax(1) != y, breakable)
        assert torch.equal(model(theirs).argmax(1) != y, breakable)


def test_the_largest_l1_radius_is_the_box_diagonal():
    assert max_eps("l1", (3, 224, 224)) == 3 * 224 * 224
    assert max_eps("l1") == float("inf")
    with pytest.raises(ValueError, match="L1 diagonal"):
        pgd(Linear(), torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), eps=17.0,
            norm="l1")


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
    (dict(eps=0.1, norm="l0"), "norm"),
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


def test_the_l1_random_start_lies_in_the_ball_and_the_box():
    # A model with no input gradient does not move the start: pgd returns it.
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.w.expand(x.shape[0], 3) + 0 * x.flatten(1).sum(1, keepdim=True)

    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8).round()  # pixels at 0 and 1: half the directions are shut
    eps = 12.0
    x_adv = pgd(Constant(), x, torch.zeros(16, dtype=torch.long), eps=eps, steps=1, norm="l1")
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    size = (x_adv.double() - x.double()).flatten(1).abs().sum(1)
    # A normal point is far outside a radius-12 ball: its projection lands on the sphere.
    torch.testing.assert_close(size, torch.full_like(size, eps), rtol=1e-6, atol=0)
    assert not torch.equal(x_adv[0] - x[0], x_adv[1] - x[1])  # each example its own start
