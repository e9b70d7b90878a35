"""The training CLI end to end: shipped configs, resume, kills, bad input, non-finite losses."""
import csv
import errno
import glob
import os
import shlex
import signal
import subprocess
import sys

import yaml

import pytest
import torch
from torch import nn

from advvit import accel, checkpoint, engine, train
from advvit.losses import LossOutput
from advvit.schedules import create_eps_schedule
from advvit.train import main
from advvit.trainer import KILL_ENV
from test_data import make_cifar_folder, make_idx_folder, make_imagefolder, write_unsafe_cifar_batch

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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_l1_training_runs_end_to_end_with_every_example_in_the_l1_ball(tmp_path, monkeypatch):
    from advvit import losses
    eps, sizes = 2.0, []

    def recorded(model, x, y, **kw):
        assert kw["norm"] == "l1" and kw["eps"] == pytest.approx(eps)
        x_adv = pgd(model, x, y, **kw)
        sizes.append((x_adv - x).flatten(1).abs().sum(1))
        return x_adv
    pgd = losses.pgd
    monkeypatch.setattr(losses, "pgd", recorded)
    args = _tiny_args(tmp_path, "--max-steps-per-epoch", "3", "--eval-batches", "1",
                      "--attack-norm", "l1")
    args[args.index("--eps") + 1] = str(eps)
    assert main(args) == 0
    best = checkpoint.load_checkpoint(tmp_path / "runs" / "run" / "best.pth")
    assert best["config"]["attack_norm"] == "l1" and best["meta"]["train_eps"] == pytest.approx(eps)
    sizes = torch.cat(sizes)
    # FGSM-RS at full eps from the first step (no warm-up): the budget is spent, never exceeded.
    assert len(sizes) >= 3 * 8 and (sizes <= eps * (1 + 1e-5)).all() and sizes.max() > eps / 2


@pytest.mark.slow
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


def _train_process(args, kill_at=None):
    """``python -m advvit.train`` in a child process, killed at a named point when asked."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "advvit.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _train_process_until(args, text):
    """``python -m advvit.train`` started in its own process group (as a scheduler's job is),
    returned with what it printed once a line of its stderr holds ``text``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(KILL_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "advvit.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return proc, seen
    proc.wait()
    raise AssertionError(f"the run ended (exit {proc.returncode}) before printing {text!r}:\n"
                         + "".join(seen))


TIMED = ("images_per_s", "seconds")  # wall-clock figures: never the same twice


def _csv_rows(run):
    with open(run / "summary.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if not k.endswith(TIMED)}
                for row in csv.DictReader(fh)]


def _tb_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if not tag.endswith(TIMED)}


def _assert_same_weights(a, b, key="model"):
    assert a[key].keys() == b[key].keys()
    for name, value in a[key].items():
        torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_a_kill_between_the_csv_row_and_the_checkpoint_leaves_the_logs_of_an_uninterrupted_run(
        tmp_path):
    args = [a for a in _tiny_args(tmp_path, "--epochs", "2") if a != "--no-tensorboard"]
    full = [a.replace(str(tmp_path / "runs"), str(tmp_path / "full")) for a in args]
    assert _train_process(full).returncode == 0
    cut = _train_process(args, kill_at="csv_appended:2")
    assert cut.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "run"
    assert checkpoint.load_checkpoint(run / "last.pth")["epoch"] == 0
    assert [r["epoch"] for r in _csv_rows(run)] == ["0", "1"]  # epoch 1 logged, not saved

    resumed = _train_process([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "dropped 1 summary.csv row(s)" in resumed.stderr
    assert _csv_rows(run) == _csv_rows(tmp_path / "full" / "run")
    assert _tb_scalars(run) == _tb_scalars(tmp_path / "full" / "run")
    assert not glob.glob(str(run / "*.tmp")) and not glob.glob(str(run / ".*.tmp"))


@pytest.mark.slow
def test_a_recovery_checkpoint_resumes_inside_an_epoch_bit_for_bit(tmp_path):
    # 6 steps per epoch; recovery.pth at steps 4 and 8; the kill comes at step 10, inside
    # epoch 1, two steps after the last recovery checkpoint (those two steps run again).
    args = [a for a in _tiny_args(tmp_path, "--epochs", "2", "--model-ema",
                                  "--model-ema-decay", "0.9", "--recovery-interval-steps", "4")
            if a != "--no-tensorboard"]
    full = [a.replace(str(tmp_path / "runs"), str(tmp_path / "full")) for a in args]
    assert _train_process(full).returncode == 0
    cut = _train_process(args, kill_at="log:10")
    assert cut.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "run"
    recovery = checkpoint.load_checkpoint(run / "recovery.pth")
    assert (recovery["epoch"], recovery["step"]) == (1, 8)
    assert recovery["extra"]["recovery"]["steps_done"] == 2

    resumed = _train_process([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 1 after 2 of its steps" in resumed.stderr
    a = checkpoint.load_checkpoint(tmp_path / "full" / "run" / "last.pth")
    b = checkpoint.load_checkpoint(run / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (1, 12)
    _assert_same_weights(a, b, "model")
    _assert_same_weights(a, b, "ema")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            torch.testing.assert_close(sb[name], sa[name], rtol=0, atol=0, msg=name)
    assert _csv_rows(run) == _csv_rows(tmp_path / "full" / "run")
    assert _tb_scalars(run) == _tb_scalars(tmp_path / "full" / "run")
    assert not (run / "recovery.pth").exists()  # superseded by the epoch's checkpoint


@pytest.mark.slow
def test_best_is_a_hard_link_to_the_epochs_checkpoint(tmp_path):
    assert main(_tiny_args(tmp_path)) == 0
    run = tmp_path / "runs" / "run"
    assert os.stat(run / "best.pth").st_ino == os.stat(run / "last.pth").st_ino


@pytest.mark.slow
def test_a_kill_before_best_is_linked_is_repaired_on_resume(tmp_path):
    args = _tiny_args(tmp_path, "--epochs", "2")
    assert _train_process(args, kill_at="last_saved:1").returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "run"
    assert (run / "last.pth").exists() and not (run / "best.pth").exists()
    resumed = _train_process([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "best.pth now holds epoch 0" in resumed.stderr
    last = checkpoint.load_checkpoint(run / "last.pth")
    best = checkpoint.load_checkpoint(run / "best.pth")
    assert best["epoch"] == last["extra"]["best_epoch"]
    assert best["best_metric"] == last["best_metric"]


def test_bad_inputs_stop_before_any_work_with_one_message(tmp_path, capsys):
    assert main(_tiny_args(tmp_path, "--data-dir", str(tmp_path / "missing"))) == 2
    assert "fashion_mnist" in capsys.readouterr().err
    assert main(_tiny_args(tmp_path, "--eps", "2")) == 2
    assert "'eps'" in capsys.readouterr().err
    assert main(_tiny_args(tmp_path, "--resume", str(tmp_path / "nope.pth"))) == 2
    assert "'resume'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run" / "last.pth").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert main(args + ["--epochs", "2", "--resume", "auto", "--resume-override", "epochs"]) == 0


def _blow_up_in_epoch(n, monkeypatch):
    """The n-th epoch ends with an infinite weight (a model whose weights blow up)."""
    original, calls = engine.train_one_epoch, {"n": 0}

    def blown(**kwargs):
        out = original(**kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            with torch.no_grad():
                next(accel.attack_model(kwargs["model"]).parameters()).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(engine, "train_one_epoch", blown)


@pytest.mark.slow
def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, capsys,
                                                                           monkeypatch):
    _blow_up_in_epoch(2, monkeypatch)
    assert main(_tiny_args(tmp_path, "--epochs", "2", "--co-check", "off")) == 1
    err = capsys.readouterr().err
    assert "weights became NaN or infinite at epoch 1" in err and "last good one is kept" in err
    run = tmp_path / "runs" / "run"
    for name in ("last.pth", "best.pth"):
        ckpt = checkpoint.load_checkpoint(run / name)
        assert ckpt["epoch"] == 0
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len((run / "summary.csv").read_text().strip().splitlines()) == 2  # epoch 0 only


def test_an_infinite_learning_rate_step_writes_no_checkpoint(tmp_path, capsys):
    args = _tiny_args(tmp_path, "--opt", "sgd", "--lr", "1e38", "--max-steps-per-epoch", "1",
                      "--co-check", "off")
    assert main(args) == 1
    assert "NaN or infinite" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run" / "last.pth").exists()


def test_check_finite_names_the_first_bad_tensor():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    engine.check_finite(model, "weights", epoch=0, step=0)
    model[1].running_var[1] = float("nan")
    with pytest.raises(engine.NonFiniteLossError, match=r"EMA weights .*first: 1.running_var"):
        engine.check_finite(model, "EMA weights", epoch=3, step=9)


@pytest.mark.slow
def test_resume_refuses_a_changed_config_and_records_allowed_overrides(tmp_path, capsys):
    assert main(_tiny_args(tmp_path)) == 0
    run = tmp_path / "runs" / "run"
    last = (run / "last.pth").read_bytes()
    assert main(_tiny_args(tmp_path, "--resume", "auto", "--lr", "0.5", "--loss", "pgd")) == 2
    err = capsys.readouterr().err
    assert "lr (None -> 0.5)" in err and "loss ('fgsm' -> 'pgd')" in err
    assert "loss, lr cannot change within a run" in err
    assert main(_tiny_args(tmp_path, "--resume", "auto", "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "epochs (1 -> 2)" in err and "--resume-override epochs" in err
    assert main(_tiny_args(tmp_path, "--resume", "auto", "--resume-override", "lr")) == 2
    assert "'lr' changes what the run computes" in capsys.readouterr().err
    assert main(_tiny_args(tmp_path, "--resume-override", "epochs")) == 2
    assert "applies only when resuming" in capsys.readouterr().err
    assert (run / "last.pth").read_bytes() == last and not (run / "resume_history.yaml").exists()

    assert main(_tiny_args(tmp_path, "--resume", "auto", "--epochs", "2",
                           "--resume-override", "epochs")) == 0
    ckpt = checkpoint.load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 1 and ckpt["config"]["epochs"] == 2
    assert ckpt["scheduler"]["t_initial"] == 12  # the schedule follows the new length (6 x 2)
    assert yaml.safe_load((run / "args.yaml").read_text())["epochs"] == 1  # as it started
    history = yaml.safe_load((run / "resume_history.yaml").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 0
    assert history[0]["changed"] == {"epochs": {"from": 1, "to": 2}}


@pytest.mark.slow
def test_recovery_by_minutes_saves_at_log_points_and_the_epoch_checkpoint_supersedes_it(
        tmp_path, monkeypatch):
    saved = []
    original = train.Trainer.save_recovery

    def record(self, epoch, progress):
        original(self, epoch, progress)
        saved.append((epoch, progress.step, progress.steps_done))
        assert checkpoint.load_checkpoint(tmp_path / "runs" / "run" / "recovery.pth")["step"] \
            == progress.step

    monkeypatch.setattr(train.Trainer, "save_recovery", record)
    args = _tiny_args(tmp_path, "--max-steps-per-epoch", "3", "--co-check", "off",
                      "--recovery-interval-minutes", "1e-9")
    assert main(args) == 0
    assert saved == [(0, 1, 1), (0, 2, 2)]  # not at step 3: last.pth follows at once
    assert not (tmp_path / "runs" / "run" / "recovery.pth").exists()


def test_recovery_steps_must_fall_on_log_points(tmp_path, capsys):
    assert main(_tiny_args(tmp_path, "--log-interval", "4", "--recovery-interval-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "'recovery_interval_steps'" in err and "multiple of log_interval (4)" in err
    assert not (tmp_path / "runs").exists()


def test_a_held_out_split_with_no_example_is_one_config_error(tmp_path, capsys):
    """val_fraction 0.01 of 48 training images holds out none: exit 2 naming the key, no
    checkpoint or log written."""
    assert main(_tiny_args(tmp_path, "--val-fraction", "0.01")) == 2
    err = capsys.readouterr().err
    assert "config key 'val_fraction'" in err and "leaves 0 for validation" in err
    assert "Traceback" not in err
    run = tmp_path / "runs" / "run"
    assert not run.exists() or not {"args.yaml", "last.pth", "summary.csv"} & set(os.listdir(run))


def test_a_cifar_batch_that_would_run_code_is_one_data_error(tmp_path, capsys):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    make_cifar_folder(folder, n_per_batch=4)
    marker = write_unsafe_cifar_batch(folder, "data_batch_3")
    args = _tiny_args(tmp_path)
    args[args.index("--dataset") + 1], args[args.index("--data-dir") + 1] = "cifar10", str(tmp_path / "cifar")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}/data_batch_3: holds objects other than arrays")
    assert "Traceback" not in err and err.count("\n") == 1 and not marker.exists()
    run = tmp_path / "runs" / "run"
    assert not run.exists() or not {"args.yaml", "last.pth", "summary.csv"} & set(os.listdir(run))


@pytest.mark.slow
def test_sigterm_stops_at_the_next_step_with_a_recovery_point_that_resumes_bit_for_bit(tmp_path):
    # 6 steps per epoch, a log point every 4: the stop comes between log points, so the
    # recovery point carries a part of a log interval. A loader worker process gets the
    # signal too, as every process of a job does from a scheduler; the restart comes in the
    # first epoch, whose worker is seeded from the epoch's RNG state, so its augmentations are
    # the uninterrupted run's.
    args = [a for a in _tiny_args(tmp_path, "--epochs", "2", "--log-interval", "4",
                                  "--co-check", "off", "--workers", "1")
            if a != "--no-tensorboard"]
    full = [a.replace(str(tmp_path / "runs"), str(tmp_path / "full")) for a in args]
    assert _train_process(full).returncode == 0
    proc, _ = _train_process_until(args, "run folder")
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 143, err
    assert "Traceback" not in err and "DataLoader worker" not in err
    run = tmp_path / "runs" / "run"
    recovery = checkpoint.load_checkpoint(run / "recovery.pth")
    assert recovery["epoch"] == 0 and 1 <= recovery["step"] < 6
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"stopped on SIGTERM at epoch 0, step {recovery['step']}; "
                              f"recovery point: {run / 'recovery.pth'}; resume with: "
                              "python -m advvit.train ")
    command = shlex.split(message.split("resume with: ")[1])
    assert command[-2:] == ["--resume", "auto"]

    resumed = _train_process(command[3:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'recovery.pth'} at epoch 0 after {recovery['step']}" \
        in resumed.stderr
    a = checkpoint.load_checkpoint(tmp_path / "full" / "run" / "last.pth")
    b = checkpoint.load_checkpoint(run / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (1, 12)
    _assert_same_weights(a, b, "model")
    assert _csv_rows(run) == _csv_rows(tmp_path / "full" / "run")
    assert _tb_scalars(run) == _tb_scalars(tmp_path / "full" / "run")


def test_an_epoch_stopped_between_log_points_goes_on_to_the_same_logs_and_weights():
    """The steps after the last log point travel in the stop's progress: the epoch continued
    from it logs and ends as the uninterrupted one, bit for bit."""
    from advvit.losses import create_loss
    rt = accel.setup("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 1, 4, 4, generator=gen), torch.randint(0, 3, (4,), generator=gen))
               for _ in range(5)]
    settings = engine.StepSettings(log_interval=2)

    def epoch(model, loader, logs, **kwargs):
        return engine.train_one_epoch(
            model=model, loss_fn=create_loss("clean", criterion=nn.CrossEntropyLoss()),
            loader=loader, optimizer=kwargs.pop("optimizer"), rt=rt,
            eps_schedule=create_eps_schedule("constant", eps=0.0), epoch=0, settings=settings,
            on_log=lambda s, m: logs.append(
                (s, {k: v for k, v in m.items() if k != "images_per_s"})),
            **kwargs)

    torch.manual_seed(0)
    whole = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    cut = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    cut.load_state_dict(whole.state_dict())
    logs_whole, logs_cut = [], []
    totals, _ = epoch(whole, batches, logs_whole, step=0,
                      optimizer=torch.optim.SGD(whole.parameters(), 0.5))
    optimizer = torch.optim.SGD(cut.parameters(), 0.5)
    with pytest.raises(engine.EpochStopped) as stopped:
        epoch(cut, batches, logs_cut, step=0, optimizer=optimizer, stop=lambda step: step == 3)
    progress = stopped.value.progress
    assert (progress.step, progress.steps_done) == (3, 3)
    assert progress.interval["host"]["count"] == 4  # step 3, after the log point at 2
    again, _ = epoch(cut, batches[3:], logs_cut, step=3, optimizer=optimizer, resume=progress)
    assert logs_cut == logs_whole and [s for s, _ in logs_whole] == [2, 4]
    assert {k: v for k, v in again.items() if k not in ("images_per_s", "seconds")} == \
        {k: v for k, v in totals.items() if k not in ("images_per_s", "seconds")}
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(cut.state_dict()[name], value, rtol=0, atol=0)


def _disk_full_at_second(monkeypatch, target):
    """The second write of ``target`` (last.pth or summary.csv) fails as a full disk does."""
    from advvit import monitor
    calls = {"n": 0}

    def full():
        calls["n"] += 1
        return calls["n"] == 2

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if target == "last.pth":
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f: no_space() if full() else save(obj, f))
    else:
        real_open = open
        monkeypatch.setattr(monitor, "open", lambda path, mode="r", **kw: no_space()
                            if "a" in mode and full() else real_open(path, mode, **kw),
                            raising=False)


@pytest.mark.parametrize("target", ["last.pth", "summary.csv"])
def test_a_full_disk_during_training_stops_with_one_message_and_keeps_the_last_checkpoint(
        tmp_path, capsys, monkeypatch, target):
    args = _tiny_args(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "1", "--eval-batches",
                      "1", "--co-check", "off")
    _disk_full_at_second(monkeypatch, target)
    assert main(args) == 1  # returned: no exception came through
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "run"
    message = err.strip().splitlines()[-1]  # after the progress lines
    assert [line for line in err.splitlines() if line.startswith("error:")] == [message]
    assert message.startswith(f"error: could not write {run / target} (ENOSPC: No space left on "
                              f"device); training stopped. {run / 'last.pth'}, the newest "
                              "checkpoint, is intact")
    assert message.endswith("--resume auto")
    assert checkpoint.load_checkpoint(run / "last.pth")["epoch"] == 0
    assert not glob.glob(str(run / ".*.tmp"))
    assert [r["epoch"] for r in _csv_rows(run)] == ["0"] + (["1"] if target == "last.pth" else [])


@pytest.mark.slow
def test_under_torchrun_sigterm_stops_every_rank_at_the_same_log_point(tmp_path):
    # torchrun passes the signal on to its ranks as well: each may see it at another step, and
    # they agree on the next log point (every 2 steps of 6; a batch of 4 on each of 2 ranks).
    args = _tiny_args(tmp_path, "--epochs", "2", "--log-interval", "2", "--co-check", "off",
                      "--batch-size", "4", "--device", "cpu")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "advvit.train"]
    proc = subprocess.Popen([*torchrun, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if "run folder" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=300)
    run = tmp_path / "runs" / "run"
    recovery = checkpoint.load_checkpoint(run / "recovery.pth")
    step = recovery["step"]
    assert recovery["epoch"] == 0 and step % 2 == 0 and step < 6, err
    assert err.count("stopped on SIGTERM") == 1  # rank 0 reports
    assert f"stopped on SIGTERM at epoch 0, step {step}; recovery point: {run / 'recovery.pth'}" \
        in err and "(under the launcher this run had, e.g. torchrun)" in err
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err

    resumed = subprocess.run([*torchrun, *args, "--resume", "auto"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at epoch 0 after {step} of its steps" in resumed.stderr
    assert checkpoint.load_checkpoint(run / "last.pth")["step"] == 12
