"""The shipped configs: the thesis-recipe ones hold the thesis's values, and every one validates.

The thesis values are those of its public code (vits-robustness-torch, configs/xcit-adv-
training.yaml and configs/xcit-adv-finetuning.yaml), which the configs' headers cite.
"""
import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

from advvit import accel, data
from advvit.config import effective_lr, load_config
from advvit.preflight import validate
from advvit.trainer import _build_loaders, _build_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _config(name, *argv):
    return load_config(["--config", os.path.join(ROOT, "configs", name), *argv])


def _header(path):
    """The comment block a config starts with."""
    lines = open(path).read().splitlines()
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "\n".join(lines[:end])


def test_imagenet_recipe_holds_the_thesis_values():
    cfg = _config("xcit_s12_adv.yaml")
    d, m, a, o = cfg.data, cfg.model, cfg.attack, cfg.optim
    assert (o.warmup_epochs, o.warmup_lr, o.min_lr) == (10, 1e-6, 1e-5)
    assert (o.epochs, o.cooldown_epochs, o.sched, o.opt, o.weight_decay) == (100, 10, "cosine",
                                                                              "adamw", 0.5)
    assert effective_lr(o, 64 * 8) == pytest.approx(5e-4)  # 64 per TPU core x 8 cores
    assert o.lr_scale == "linear"
    assert d.interpolation == "bicubic"
    assert (d.scale, d.ratio, d.hflip, d.color_jitter) == ([0.08, 1.0], [0.75, 1.3333333], 0.5,
                                                           0.4)
    assert (d.auto_augment, d.mixup, d.cutmix, d.reprob, d.smoothing) == (None, 0, 0, 0, 0.1)
    assert (m.model, m.drop_path, m.normalize) == ("xcit_small_12_p16_224", 0.05, "none")
    assert (a.loss, a.attack_steps, a.attack_norm, a.random_init) == ("fgsm", 1, "linf", True)
    assert a.eps == pytest.approx(4 / 255)
    assert (a.eps_schedule, a.eps_warmup_epochs, a.zero_eps_epochs) == ("linear", 10, 0)
    assert a.attack_step_size_rule == "final" and a.eval_attack == "train"
    # Precision is one key; bf16 is a listed deviation from the thesis's fp32.
    assert cfg.run.amp == "bf16"
    assert "amp: bf16" in _header(os.path.join(ROOT, "configs", "xcit_s12_adv.yaml"))


def test_cifar10_recipe_holds_the_thesis_fine_tuning_values():
    cfg = _config("xcit_s12_cifar10_trades.yaml")
    d, m, a, o = cfg.data, cfg.model, cfg.attack, cfg.optim
    assert (o.lr, o.lr_base, o.lr_base_size, o.lr_scale) == (None, 2e-4, 512, "sqrt")
    assert effective_lr(o, 512) == pytest.approx(2e-4)
    assert effective_lr(o, 128) == pytest.approx(1e-4)  # sqrt(128 / 512) = 1/2
    assert (o.warmup_epochs, o.warmup_lr, o.cooldown_epochs, o.min_lr) == (5, 1e-6, 2, 5e-6)
    assert (o.epochs, o.opt, o.sched, o.weight_decay) == (20, "adamw", "cosine", 0.5)
    assert (d.crop_padding, d.rotation, d.color_jitter, d.hflip) == (4, 2.0, 0.25, 0.5)
    assert (d.mixup, d.cutmix, d.reprob, d.smoothing, d.img_size) == (0, 0, 0, 0.0, 32)
    assert (m.model, m.drop_path, m.normalize) == ("xcit_small_12_p4_32", 0.05, "dataset")
    assert (a.loss, a.trades_beta, a.attack_steps, a.eps_warmup_epochs) == ("trades", 6.0, 10, 0)
    assert a.eps == pytest.approx(8 / 255)
    # A held-out split of the training data for model selection (the thesis: the test split).
    assert 0 < d.val_fraction < 0.1
    loss = _build_loss(cfg, accel.setup("cpu"))
    assert (type(loss).__name__, loss.steps, loss.beta) == ("TRADESLoss", 10, 6.0)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_says_what_it_reproduces_and_validates(path, tmp_path):
    header = _header(path)
    assert "eproduces" in header or "baseline" in header or "Trains" in header
    assert "eviation" in header
    classes = tmp_path / "classes.txt"  # an image folder's classes without the images
    classes.write_text("\n".join(f"n{i:08d}" for i in range(1000)))
    cfg = load_config(["--config", path])
    argv = ["--class-list", str(classes)] if cfg.data.dataset == "imagefolder" else []
    info, spec = validate(load_config(["--config", path, *argv]), world_size=8)
    assert spec.arch == cfg.model.model


class _White(torch.utils.data.Dataset):
    """White 32x32 images: RandomCrop's zero padding shows as black bands."""

    transform = None

    def __len__(self):
        return 64

    def __getitem__(self, index):
        img = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))
        return (self.transform(img) if self.transform else img), 0


def test_crop_padding_pads_and_crops_and_rotation_follows():
    torch.manual_seed(0)
    loader = data.create_loader(_White(), img_size=32, in_chans=3, batch_size=64,
                                is_training=True, hflip=0.0, color_jitter=0.0, crop_padding=4,
                                interpolation="bicubic")
    x, _ = next(iter(loader))
    assert x.shape == (64, 3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    black = (x == 0).all(dim=1)  # (B, H, W)
    assert black.any()  # some crops are shifted into the padding
    # ... by at most 4 pixels: black only in bands along the edges.
    assert not black[:, 4:28, 4:28].any()
    steps = loader.dataset.transform.fns[1].transforms
    names = [type(t).__name__ for t in steps]
    assert names[0] == "RandomCrop" and steps[0].padding == 4
    rotated = data.create_loader(_White(), img_size=32, in_chans=3, batch_size=4,
                                 is_training=True, crop_padding=4, rotation=2.0)
    steps = rotated.dataset.transform.fns[1].transforms
    assert [type(t).__name__ for t in steps[:2]] == ["RandomCrop", "RandomRotation"]
    assert steps[1].degrees == [-2.0, 2.0]


def test_interpolation_reaches_timms_crop():
    loader = data.create_loader(_White(), img_size=24, in_chans=3, batch_size=4,
                                is_training=True, interpolation="bicubic")
    crop = loader.dataset.transform.fns[1].transforms[0]
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation"
    assert "bicubic" in repr(crop)


def test_cifar10_config_builds_its_loaders_with_the_thesis_augmentation(tmp_path):
    from test_data import make_cifar_folder
    make_cifar_folder(tmp_path / "cifar", n_per_batch=20)
    cfg = _config("xcit_s12_cifar10_trades.yaml", "--data-dir", str(tmp_path / "cifar"),
                  "--workers", "0")
    info, spec = validate(cfg, world_size=1)
    train_loader, val_loader = _build_loaders(cfg, accel.setup("cpu"), spec)
    # 100 training images, 2% (2) held out for selection; the test split stays untouched.
    assert len(train_loader.dataset) == 98 and len(val_loader.dataset) == 2
    names = [type(t).__name__ for t in train_loader.dataset.transform.fns[1].transforms]
    assert names[:4] == ["RandomCrop", "RandomRotation", "RandomHorizontalFlip", "ColorJitter"]
