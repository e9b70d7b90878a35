"""advvit.analysis.perturbations: known answers on linear models and synthetic images."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advvit.attack_names import parse_attack
from advvit.suites import run_attack
from advvit.analysis import perturbations as P

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 8, 8)
D = math.prod(SHAPE)


def _linear(num_classes: int, seed: int, scale: float = 0.01) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(D, num_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(num_classes, D, generator=g) * scale)
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval()


def _weights(model: nn.Module) -> torch.Tensor:
    return model[1].weight.detach().view(-1, *SHAPE)


def _interior(n: int, seed: int = 0) -> torch.Tensor:
    """Images well inside [0, 1], so no step of a small attack is clipped by the box."""
    return 0.3 + 0.4 * torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _masks(num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    """One random binary pattern per class (1 channel replicated to 3)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num_classes, 1, 8, 8, generator=g) > 0.5).float().expand(-1, 3, -1, -1)


def _template_judge(masks: torch.Tensor) -> nn.Module:
    """A linear classifier that scores each class's pattern: right on clean patterns."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, len(masks)))
    with torch.no_grad():
        model[1].weight.copy_((2 * masks - 1).flatten(1) * 0.1)
        model[1].bias.zero_()
    return model.eval()


# ----------------------------------------------------------------------------- perturbations

@pytest.mark.parametrize("random_init", [False, True])
def test_linear_model_perturbation_is_the_sign_of_the_class_difference_weight(random_init):
    model = _linear(2, seed=1)
    x, eps = _interior(6), 0.05
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    # From a random start the default 1.5 eps of travel may not reach the far corner.
    step = 2.5 * eps / 20 if random_init else None
    p = P.perturbation_images(model, x, y, eps=eps, steps=20, step_size=step,
                              random_init=random_init, seed=3, batch_size=4)
    w = _weights(model)
    # Cross-entropy ascent for a 2-class linear model: -(1 - p_y) (w_y - w_other).
    expected = -torch.sign(w[y] - w[1 - y])
    assert torch.equal(torch.sign(p.delta), expected)
    assert torch.allclose(p.delta.abs(), torch.full_like(p.delta, eps), atol=1e-6)
    assert torch.allclose(p.delta_viz, (expected + 1) / 2, atol=1e-5)
    assert p.delta_grey.shape == (6, 1, 8, 8)
    assert p.steps == 20 and p.eps == eps and p.n == 6


def test_perturbation_images_do_not_depend_on_the_batch_size():
    model = _linear(3, seed=2, scale=0.1)
    x, y = _interior(7), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    a = P.perturbation_images(model, x, y, eps=8 / 255, steps=5, random_init=True, seed=5,
                              batch_size=2)
    b = P.perturbation_images(model, x, y, eps=8 / 255, steps=5, random_init=True, seed=5,
                              batch_size=7)
    c = P.perturbation_images(model, x, y, eps=8 / 255, steps=5, random_init=True, seed=6,
                              batch_size=7)
    assert torch.allclose(a.x_adv, b.x_adv, atol=1e-6)
    assert not torch.allclose(a.x_adv, c.x_adv)
    assert (a.delta.abs() <= 8 / 255 + 1e-6).all()


def test_perturbation_viz_and_grey():
    delta = torch.tensor([-0.1, 0.0, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(P.perturbation_viz(delta, 0.1).flatten(), torch.tensor([0.0, 0.5, 1.0]))
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    assert torch.allclose(P.to_grey(red), torch.full((1, 1, 2, 2), 0.299))


def test_eps_outside_the_ball_is_refused():
    model, x, y = _linear(2, 0), _interior(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="above 1"):
        P.perturbation_images(model, x, y, eps=4.0)
    with pytest.raises(ValueError, match="L2 diagonal"):
        P.class_visualization(model, SHAPE, [0], eps=2 * math.sqrt(D))


# ------------------------------------------------------------------------- class visualization

def test_class_visualization_of_a_linear_model_moves_along_its_class_weight():
    model = _linear(2, seed=4)
    w = _weights(model)
    start = torch.full((2, *SHAPE), 0.5)
    eps = 0.5
    viz = P.class_visualization(model, SHAPE, [0, 1], eps=eps, steps=10, start=start)
    move = (viz.images - start).flatten(1)
    for i, t in enumerate([0, 1]):
        direction = (w[t] - w[1 - t]).flatten()
        cos = torch.dot(move[i], direction) / (move[i].norm() * direction.norm())
        assert cos.item() == pytest.approx(1.0, abs=1e-5)
        assert move[i].norm().item() == pytest.approx(eps, rel=1e-4)
    assert (viz.confidence > viz.start_confidence).all()
    assert torch.equal(viz.targets, torch.tensor([0, 1]))


def test_class_visualization_from_noise_reaches_every_class():
    model = _linear(4, seed=5, scale=0.1)
    viz = P.class_visualization(model, SHAPE, range(4), per_class=2, steps=20, eps=3.0, seed=1,
                                batch_size=3)
    assert viz.images.shape == (8, *SHAPE) and viz.targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert viz.success.all()
    assert ((viz.images - viz.start).flatten(1).norm(dim=1) <= 3.0 + 1e-4).all()
    again = P.class_visualization(model, SHAPE, range(4), per_class=2, steps=20, eps=3.0, seed=1,
                                  batch_size=8)
    assert torch.allclose(viz.images, again.images, atol=1e-6)


def test_default_class_viz_eps_scales_the_thesis_eps():
    assert P.default_class_viz_eps((3, 224, 224)) == pytest.approx(15.0)
    assert P.default_class_viz_eps((1, 32, 32)) == pytest.approx(15 * math.sqrt(1024 / 150528))


# ------------------------------------------------------------------------------ semantic score

def _noisy_patterns(masks: torch.Tensor, per_class: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(masks)).repeat_interleave(per_class)
    x = (0.25 + 0.5 * masks[y] + 0.6 * torch.randn(len(y), *SHAPE, generator=g)).clamp(0, 1)
    return x, y


def test_semantic_score_of_the_source_on_its_clean_images_is_its_accuracy():
    masks = _masks()
    judge = _template_judge(masks)
    x, y = _noisy_patterns(masks, per_class=20)
    p = P.perturbation_images(judge, x, y, eps=8 / 255, steps=3)
    score = P.semantic_score({"m": p}, {"m": judge}, seed=0)
    clean = score.kinds.index("clean")
    assert score.top1[0, 0, clean].item() == pytest.approx(p.clean_accuracy)
    assert 0.3 < p.clean_accuracy < 1.0  # a real accuracy, not a trivial one
    c1, ck = P.topk_correct(judge, x, y, k=5)
    assert score.topk[0, 0, clean].item() == pytest.approx(ck.double().mean().item())
    assert score.k == 5 and score.chance_top1 == pytest.approx(0.1)


def test_noise_images_score_near_chance():
    masks = _masks()
    judge = _template_judge(masks)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(2000, *SHAPE, generator=g)
    y = torch.arange(10).repeat(200)
    top1, top5 = P.topk_correct(judge, noise, y, k=5)
    assert top1.double().mean().item() == pytest.approx(0.1, abs=0.03)
    assert top5.double().mean().item() == pytest.approx(0.5, abs=0.05)


def test_random_sign_control_is_chance_inside_the_box_and_leaks_the_outline_at_its_edges():
    masks = _masks()
    judge = _template_judge(masks)
    y = torch.arange(10).repeat(20)
    eps = 8 / 255
    inside = 0.3 + 0.4 * masks[y]       # no pixel at 0 or 1: the box cuts nothing
    saturated = masks[y].clone()        # pixels at 0 and 1: the box cuts every perturbation
    results = {}
    for name, x in (("inside", inside), ("saturated", saturated)):
        p = P.perturbation_images(judge, x, y, eps=eps, steps=2)
        results[name] = P.semantic_score({"m": p}, {"judge": judge}, seed=0)
    rn = P.SEMANTIC_KINDS.index("random-negative")
    assert results["inside"].top1[0, 0, rn].item() == pytest.approx(0.1, abs=0.1)
    assert results["saturated"].top1[0, 0, rn].item() > 0.9
    delta = P.random_sign_perturbation(saturated, eps, "linf", seed=0)
    assert ((saturated + delta) >= 0).all() and ((saturated + delta) <= 1).all()
    size = delta.abs()
    assert ((size < 1e-7) | ((size - eps).abs() < 1e-6)).all()


# ----------------------------------------------------------------------------- transfer matrix

@pytest.mark.parametrize("attack,steps,norm,eps", [
    ("pgd", 5, "linf", 16 / 255), ("apgd-ce", 5, "linf", 16 / 255),
    ("pgd", 5, "l1", 8.0), ("apgd-ce", 5, "l1", 8.0)])
def test_transfer_diagonal_is_the_white_box_accuracy_of_advvit_eval(attack, steps, norm, eps):
    masks = _masks()
    x, y = _noisy_patterns(masks, per_class=6, seed=2)
    a = _template_judge(masks)
    b = _template_judge(_masks(seed=0) * 0.5 + 0.25)  # another linear model on the same task
    tm = P.transfer_matrix({"a": a, "b": b}, x, y, attack=attack, eps=eps, steps=steps,
                           norm=norm, seed=7, batch_size=16)
    assert tm.norm == norm
    spec = parse_attack(attack, steps=steps, restarts=1 if attack == "apgd-ce" else None)
    for i, model in enumerate((a, b)):
        white = run_attack(model, x, y, spec, eps=eps, norm=norm, seed=7, batch_size=16,
                           num_classes=10, keep_adv=True)
        delta = (white.x_adv - x).flatten(1)
        size = delta.abs().sum(1) if norm == "l1" else delta.abs().amax(1)
        assert (size <= eps * (1 + 1e-5)).all() and (white.x_adv >= 0).all() \
            and (white.x_adv <= 1).all()
        # the same examples survive (the runner's own mean is float32)
        assert round(tm.accuracy[i, i].item() * len(y)) == int(white.robust.sum())
        assert tm.accuracy[i, i].item() == pytest.approx(white.robust_accuracy)
        assert tm.white_box[i, i] and not tm.white_box[i, 1 - i]
        assert torch.equal(tm.fooled[i], white.clean & ~white.robust)
        other = (b, a)[i]
        with torch.no_grad():
            expected = (other(white.x_adv).argmax(1) == y).double().mean().item()
        assert tm.accuracy[i, 1 - i].item() == pytest.approx(expected)
    with torch.no_grad():
        assert tm.clean_accuracy[0].item() == pytest.approx((a(x).argmax(1) == y).double().mean().item())
    assert tm.accuracy[0, 0] < tm.clean_accuracy[0]  # the attack did something


def test_transfer_matrix_refuses_unknown_attacks():
    with pytest.raises(ValueError, match="attack must be one of"):
        P.transfer_matrix({"a": _linear(2, 0)}, _interior(2), torch.tensor([0, 1]),
                          attack="square", eps=0.01)
