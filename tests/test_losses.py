"""The pluggable losses: known reductions, gradient flow, eps changes and bad arguments."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advvit.attacks import pgd
from advvit.losses import (DEFAULT_STEPS, AdversarialLoss, CleanLoss, LossOutput, TRADESLoss,
                           create_loss, default_steps)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _all_params_get_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("loss_fn", [
    CleanLoss(), AdversarialLoss(eps=8 / 255), AdversarialLoss(eps=0.1, steps=3, norm="l2"),
    AdversarialLoss(eps=2.0, steps=2, norm="l1"), TRADESLoss(eps=8 / 255, steps=2),
    TRADESLoss(eps=2.0, steps=2, norm="l1")])
def test_every_loss_returns_a_loss_output_and_gradients_reach_parameters(loss_fn):
    model, (x, y) = _model().train(), _batch()
    out = loss_fn(model, x, y)
    assert isinstance(out, LossOutput)
    loss, clean, adv = out
    assert loss.dim() == 0 and torch.isfinite(loss)
    for logits in (clean, adv):
        assert logits is None or (logits.shape == (6, 5) and not logits.requires_grad)
    assert _all_params_get_grads(model, loss)


def test_adversarial_loss_is_the_criterion_on_pgd_examples():
    model, (x, y) = _model().train(), _batch()
    reference = copy.deepcopy(model)  # the loss's train-mode forward moves BatchNorm statistics
    torch.manual_seed(3)
    out = AdversarialLoss(eps=0.05, steps=2)(model, x, y)
    torch.manual_seed(3)
    model = reference
    x_adv = pgd(model, x, y, eps=0.05, steps=2)
    logits = model(x_adv)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, y))
    torch.testing.assert_close(out.adv_logits, logits.detach())
    assert out.clean_logits is None  # the default skips the extra forward


def test_adversarial_loss_raises_the_loss_and_reports_clean_logits_on_request():
    model, (x, y) = _model().eval(), _batch(n=32)
    clean = F.cross_entropy(model(x), y)
    out = AdversarialLoss(eps=0.1, steps=5, clean_logits=True)(model, x, y)
    assert out.loss > clean
    torch.testing.assert_close(out.clean_logits, model(x).detach())


def test_eps_zero_costs_no_attack_and_equals_clean_training():
    model, (x, y) = _model().eval(), _batch()
    calls = []
    loss_fn = AdversarialLoss(eps=0.1, on_step=lambda: calls.append(1))
    loss_fn.eps = 0.0  # what the warm-up schedule does at step 0
    out = loss_fn(model, x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))
    torch.testing.assert_close(out.clean_logits, out.adv_logits)
    assert calls == []
    loss_fn.eps = 0.1
    loss_fn(model, x, y)
    assert calls == [1]


def test_trades_with_beta_zero_is_clean_cross_entropy():
    model, (x, y) = _model().eval(), _batch()
    out = TRADESLoss(eps=8 / 255, beta=0.0)(model, x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


def test_trades_is_natural_loss_plus_beta_kl_with_grads_through_both_terms():
    model, (x, y) = _model().eval(), _batch()
    beta = 6.0
    out = TRADESLoss(eps=8 / 255, beta=beta, steps=3)(model, x, y)
    kl = F.kl_div(F.log_softmax(out.adv_logits, 1), F.softmax(out.clean_logits, 1),
                  reduction="batchmean")
    torch.testing.assert_close(out.loss, F.cross_entropy(out.clean_logits, y) + beta * kl)
    assert kl > 0
    # The KL term alone must send gradient through the clean branch too (f(x) not detached).
    model.zero_grad()
    out_kl = TRADESLoss(eps=8 / 255, beta=1.0, steps=1, criterion=lambda l, t: 0 * l.sum())
    loss = out_kl(model, x, y).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_trades_inner_attack_increases_the_kl():
    model, (x, y) = _model().eval(), _batch(n=32)
    p_clean = F.softmax(model(x), 1).detach()
    kl = lambda xa: F.kl_div(F.log_softmax(model(xa), 1), p_clean, reduction="batchmean")
    out = TRADESLoss(eps=0.1, steps=5)(model, x, y)
    noise = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    assert F.kl_div(F.log_softmax(out.adv_logits, 1), p_clean, reduction="batchmean") > kl(noise)


def test_soft_targets_from_mixup_work_with_the_default_criterion():
    model, (x, y) = _model().train(), _batch()
    soft = F.one_hot(y, 5).float() * 0.9 + 0.02
    out = AdversarialLoss(eps=0.05)(model, x, soft)
    assert torch.isfinite(out.loss)


def test_attack_model_is_the_one_attacked():
    model, (x, y) = _model().train(), _batch()
    seen = []

    class Probe(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            seen.append(1)
            return self.inner(t)

    AdversarialLoss(eps=0.05, steps=3)(model, x, y, attack_model=Probe(model))
    assert len(seen) == 3


def test_create_loss_by_name():
    assert isinstance(create_loss("clean"), CleanLoss)
    fgsm = create_loss("fgsm", eps=4 / 255, steps=1)
    assert isinstance(fgsm, AdversarialLoss) and fgsm.steps == 1
    assert create_loss("pgd", eps=0.1, steps=3).steps == 3
    assert isinstance(create_loss("trades", eps=0.1, beta=3.0), TRADESLoss)
    with pytest.raises(ValueError, match="unknown loss 'madry'"):
        create_loss("madry")
    # A multi-step FGSM is a contradiction, not something to overrule silently.
    with pytest.raises(ValueError, match="'fgsm' takes 1 attack step"):
        create_loss("fgsm", eps=4 / 255, steps=5)


@pytest.mark.parametrize("name, steps", [("fgsm", 1), ("pgd", 10), ("trades", 10),
                                         ("adversarial", 1)])
def test_one_default_step_count_per_loss(name, steps):
    # create_loss, the classes and the config all read DEFAULT_STEPS: TRADES named alone is
    # TRADES-10 (the thesis's CIFAR-10 fine-tuning), as TRADESLoss() is.
    assert DEFAULT_STEPS[name] == steps
    assert create_loss(name, eps=0.1).steps == steps
    assert create_loss(name, eps=0.1, steps=None).steps == steps
    assert TRADESLoss(eps=0.1).steps == DEFAULT_STEPS["trades"] == 10
    assert AdversarialLoss(eps=0.1).steps == DEFAULT_STEPS["fgsm"] == 1
    assert default_steps(name, 3) == 3
    with pytest.raises(ValueError, match="no attack steps"):
        default_steps("clean")


@pytest.mark.parametrize("cls, kwargs, name", [
    (AdversarialLoss, dict(eps=-1.0), "eps"), (AdversarialLoss, dict(eps=0.1, steps=0), "steps"),
    (AdversarialLoss, dict(eps=0.1, norm="l0"), "norm"), (TRADESLoss, dict(eps=0.1, beta=-1), "beta"),
    (AdversarialLoss, dict(eps=0.1, steps=True), "steps"),
    (AdversarialLoss, dict(eps=0.1, step_size=0.0), "step_size"),
    (TRADESLoss, dict(eps=0.1, attack_mode="test"), "attack_mode")])
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)
