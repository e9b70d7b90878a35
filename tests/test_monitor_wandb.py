"""``log_wandb``: the TensorBoard scalars, the same, in a Weights & Biases run (offline, read back
from the run's own file)."""
from __future__ import annotations

import glob
import json
import math
import time
from pathlib import Path

import pytest

from advvit.monitor import Monitor

pytest.importorskip("wandb", reason="pip install 'advvit[wandb]'")


def wandb_history(run_dir: Path, wait_s: float = 60) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the offline run under ``run_dir/wandb``, once its exit record is
    written (W&B's service writes the file after ``finish`` returns).

    The ``.wandb`` file is a LevelDB-style log (7-byte file header; 32 KiB blocks of records with
    a 7-byte header: crc, length, type) of W&B's protobuf ``Record``s; wandb ships no reader.
    """
    deadline = time.monotonic() + wait_s
    while True:
        history, done = _read_run(run_dir)
        if done or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def _read_run(run_dir: Path) -> tuple[dict[int, dict[str, float]], bool]:
    from wandb.proto import wandb_internal_pb2
    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, chunks, history, done = Path(path).read_bytes(), 7, b"", {}, False
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768  # a block's trailer
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            done = done or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                step = int(items.pop("_step"))
                history.setdefault(step, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return history, done


def test_log_wandb_logs_the_tensorboard_scalars(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = Monitor(str(tmp_path), log_wandb=True, config={"run": {"seed": 3}})
    monitor.step(0, 1, {"loss": 2.5, "lr": 0.1})
    monitor.step(0, 2, {"loss": 2.0, "lr": 0.1})
    monitor.epoch(0, 2, {"loss": 2.2}, {"robust_acc": 0.25, "clean_acc": 0.5})
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tensorboard: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            tensorboard.setdefault(e.step, {})[tag] = e.value
    wandb = wandb_history(tmp_path)
    assert wandb.keys() == tensorboard.keys() == {1, 2}
    for step, scalars in tensorboard.items():
        assert wandb[step].keys() == scalars.keys()
        assert all(math.isclose(wandb[step][k], v, rel_tol=1e-6) for k, v in scalars.items())
    assert wandb[2]["epoch/val_robust_acc"] == 0.25


def test_log_wandb_without_wandb_is_refused_before_any_work(monkeypatch):
    import importlib.util

    from advvit import preflight
    from advvit.config import ConfigError, TrainConfig
    cfg = TrainConfig()
    cfg.run.log_wandb = True
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"config key 'log_wandb': wandb is not installed "
                                          r"\(pip install 'advvit\[wandb\]'"):
        preflight.validate(cfg, 1)


@pytest.mark.slow
def test_a_training_run_with_log_wandb_logs_its_epochs(tmp_path, monkeypatch):
    from advvit.train import main
    from test_data import make_idx_folder
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_idx_folder(tmp_path / "fmnist", n_train=16, n_test=8)
    assert main(["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "fmnist"),
                 "--model", "xcit_nano_12_p8_32", "--img-size", "32", "--batch-size", "8",
                 "--output", str(tmp_path / "runs"), "--experiment", "run", "--eps", "8/255",
                 "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0",
                 "--eps-warmup-epochs", "0", "--zero-eps-epochs", "0", "--min-lr", "0",
                 "--workers", "0", "--log-interval", "1", "--amp", "none", "--co-check", "warn",
                 "--log-wandb"]) == 0
    history = wandb_history(tmp_path / "runs" / "run")
    last = history[max(history)]
    assert "epoch/val_robust_acc" in last and "train/loss" in history[min(history)]
