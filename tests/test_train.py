"""The training CLI end to end: shipped configs, resume, kills, bad input, non-finite losses."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from advvit import accel, checkpoint, engine
from advvit.losses import LossOutput
from advvit.schedules import create_eps_schedule
from advvit.train import main
from test_data import make_cifar_folder, make_idx_folder, make_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

# One-epoch runs: no warm-ups (a warm-up longer than the run is refused) and min_lr 0 (the
# shipped configs' min_lr is above their lr_base scaled to a batch of 2).
FAST = ["--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--workers", "0",
        "--eps-warmup-epochs", "0", "--zero-eps-epochs", "0", "--min-lr", "0",
        "--log-interval", "1", "--no-tensorboard", "--amp", "none"]


def _tiny_args(tmp_path, *extra):
    data = tmp_path / "fmnist"
    if not data.exists():
        make_idx_folder(data, n_train=48, n_test=16)
    return ["--dataset", "fashion_mnist", "--data-dir", str(data), "--model", "xcit_nano_12_p8_32",
            "--img-size", "32", "--batch-size", "8", "--output", str(tmp_path / "runs"),
            "--experiment", "run", "--eps", "8/255", "--co-check", "warn", *FAST, *extra]


def _data_for(cfg_path, tmp_path):
    text = open(cfg_path).read()
    if "dataset: fashion_mnist" in text:
        make_idx_folder(tmp_path / "fmnist", n_train=8, n_test=4)
        return str(tmp_path / "fmnist")
    if "dataset: cifar10" in text:
        make_cifar_folder(tmp_path / "cifar", n_per_batch=10)  # 1 of 50 held out at 2%
        return str(tmp_path / "cifar")
    make_imagefolder(tmp_path / "images", per_class=2)
    return str(tmp_path / "images")


@pytest.mark.parametrize("cfg_path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_takes_a_training_step(cfg_path, tmp_path):
    argv = ["--config", cfg_path, "--data-dir", _data_for(cfg_path, tmp_path),
            "--batch-size", "2", "--max-steps-per-epoch", "1", "--eval-batches", "1",
            "--output", str(tmp_path / "runs"), "--experiment", "step", *FAST]
    assert main(argv) == 0
    run = tmp_path / "runs" / "step"
    assert (run / "args.yaml").exists() and (run / "summary.csv").exists()
    ckpt = checkpoint.load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 0 and ckpt["step"] == 1


def test_run_folder_holds_args_checkpoints_csv_and_tensorboard(tmp_path):
    argv = [a for a in _tiny_args(tmp_path) if a != "--no-tensorboard"]
    assert main(argv + ["--epochs", "2"]) == 0
    run = tmp_path / "runs" / "run"
    for name in ("args.yaml", "last.pth", "best.pth", "summary.csv"):
        assert (run / name).exists(), name
    assert glob.glob(str(run / "tb" / "events.out.tfevents.*"))
    rows = (run / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "val_robust_acc" in rows[0] and "co_pgd_acc" in rows[0]
    best = checkpoint.load_checkpoint(run / "best.pth")
    assert best["meta"]["train_eps"] == pytest.approx(8 / 255)
    assert best["config"]["model"] == "xcit_nano_12_p8_32"


def test_resume_after_one_epoch_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert main(_tiny_args(full, "--epochs", "2")) == 0
    cut = tmp_path / "cut"
    # Stop after the first epoch by making the second one raise, as a preemption would.
    calls = {"n": 0}
    original = engine.train_one_epoch

    def preempted(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(**kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", preempted)
    with pytest.raises(KeyboardInterrupt):
        main(_tiny_args(cut, "--epochs", "2"))
    monkeypatch.setattr(engine, "train_one_epoch", original)
    assert checkpoint.load_checkpoint(cut / "runs" / "run" / "last.pth")["epoch"] == 0
    assert main(_tiny_args(cut, "--epochs", "2", "--resume", "auto")) == 0

    a = checkpoint.load_checkpoint(full / "runs" / "run" / "last.pth")
    b = checkpoint.load_checkpoint(cut / "runs" / "run" / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)


def test_sigkill_leaves_a_loadable_checkpoint_and_the_run_resumes(tmp_path):
    args = _tiny_args(tmp_path, "--epochs", "30")
    proc = subprocess.Popen([sys.executable, "-m", "advvit.train", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "run" / "last.pth"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # into the next epoch, or into the next save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    epoch = checkpoint.load_checkpoint(last)["epoch"]
    assert not glob.glob(str(last) + "*.tmp*")
    assert main(_tiny_args(tmp_path, "--epochs", str(epoch + 2), "--resume", "auto")) == 0
    assert checkpoint.load_checkpoint(last)["epoch"] == epoch + 1


def test_bad_inputs_stop_before_any_work_with_one_message(tmp_path, capsys):
    assert main(_tiny_args(tmp_path, "--data-dir", str(tmp_path / "missing"))) == 2
    assert "fashion_mnist" in capsys.readouterr().err
    assert main(_tiny_args(tmp_path, "--eps", "2")) == 2
    assert "'eps'" in capsys.readouterr().err
    assert main(_tiny_args(tmp_path, "--resume", str(tmp_path / "nope.pth"))) == 2
    assert "'resume'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run" / "last.pth").exists()


def test_existing_run_is_never_overwritten_and_other_architectures_are_refused(tmp_path, capsys):
    assert main(_tiny_args(tmp_path)) == 0
    last = tmp_path / "runs" / "run" / "last.pth"
    before = last.read_bytes()
    assert main(_tiny_args(tmp_path)) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert main(_tiny_args(tmp_path, "--model", "resnet18_gelu", "--resume", "auto")) == 2
    assert "'resume'" in capsys.readouterr().err
    assert last.read_bytes() == before


class _NaNLoss(nn.Module):
    eps = 0.0

    def forward(self, model, x, y, attack_model=None):
        logits = model(x)
        return LossOutput(logits.sum() * float("nan"), logits.detach(), None)


def test_non_finite_loss_stops_the_epoch_with_a_message():
    rt = accel.setup("cpu")
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    loader = [(torch.rand(4, 1, 4, 4), torch.randint(0, 3, (4,))) for _ in range(3)]
    with pytest.raises(engine.NonFiniteLossError, match="NaN or infinite"):
        engine.train_one_epoch(model=model, loss_fn=_NaNLoss(), loader=loader,
                               optimizer=torch.optim.SGD(model.parameters(), 0.1), rt=rt,
                               eps_schedule=create_eps_schedule("constant", eps=0.0), epoch=0,
                               step=0, settings=engine.StepSettings(log_interval=100))


def test_with_ema_the_best_checkpoint_is_chosen_by_the_ema_weights(tmp_path):
    args = _tiny_args(tmp_path, "--model-ema", "--model-ema-decay", "0.5", "--normalize",
                      "dataset")
    assert main(args) == 0
    run = tmp_path / "runs" / "run"
    header = (run / "summary.csv").read_text().splitlines()[0].split(",")
    assert "val_robust_acc" in header and "raw_robust_acc" in header
    best = checkpoint.load_checkpoint(run / "best.pth")
    assert best.get("ema") is not None and best["spec"]["normalize"] is not None
    # The EMA restores on resume too (its weights are stored without the wrapper).
    assert main(args + ["--epochs", "2", "--resume", "auto"]) == 0
