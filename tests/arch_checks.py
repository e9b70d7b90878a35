"""Checks every registered architecture must pass: gradients, an adversarial step, export / reload."""
import torch

import timm
from advvit import checkpoint as C
from advvit import models as M
from advvit.losses import AdversarialLoss


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def params_without_gradient(model, x):
    """Names of the parameters a backward pass of the logits leaves without a (non-zero) gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).logsumexp(dim=1).sum().backward()
    return [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]


def adversarial_step_changes_every_parameter(model, x, y):
    """One FGSM-RS step (advvit.losses.AdversarialLoss + AdamW): returns the loss and the names of
    parameters the step left unchanged."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    out = AdversarialLoss(eps=8 / 255, steps=1, clean_logits=True)(model, x, y)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    assert model.training, "the attack must give the model back in train mode"
    assert out.adv_logits.shape == out.clean_logits.shape == (x.shape[0], model.num_classes)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    return float(out.loss.detach()), unchanged


def export_and_reload(tmp_path, arch, *, in_chans, img_size, num_classes=10, **model_args):
    """Train-free round trip: checkpoint -> export_timm -> timm "local-dir:" -> same logits."""
    torch.manual_seed(0)
    model = M.create_model(arch, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **model_args)
    spec = C.ModelSpec(arch, num_classes, in_chans, img_size, None, model_args=model_args)
    path = tmp_path / "last.pth"
    C.save_checkpoint(path, C.make_checkpoint(model, spec, config={}, epoch=0, step=1))
    out = C.export_timm(path, tmp_path / "export")
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(2, in_chans, img_size, img_size)
    return model.eval()(x), reloaded(x), out
