"""advvit.accel on torch-xla, for real: PJRT on the CPU, a small XCiT, adversarial training steps.

Runs only where torch_xla imports (its own environment: ``scripts/setup_xla_env.sh``, then
``scripts/run_xla_tests.sh``); elsewhere the module skips with the reason. The run script sets
ADVVIT_REQUIRE_XLA=1, which turns that skip into a failure, so a broken XLA environment in CI
cannot pass as "skipped".

What is checked, from torch_xla's own counters (``torch_xla.debug.metrics``):
* the step barrier (``accel.barrier``) runs once per attack iteration and cuts the graph there:
  each training step executes exactly ``attack_steps + 1`` graphs;
* after a few warm-up steps no graph is compiled again (FGSM-RS and PGD-2, with eps changing
  every step as in the warm-up schedule);
* metrics stay on the device: no device-to-host transfer during the steps, one per log interval.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# torch-xla reads these when its runtime starts, so before it is imported. CPU: the test runs
# the real XLA compiler and runtime without a TPU. A low LLVM optimisation level makes each
# compile ~2.5x faster (the graphs run slower, which these few steps do not mind).
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")

import advvit  # noqa: E402  (before timm: the torchvision guard)
from advvit import accel  # noqa: E402

if not accel.xla_available():
    reason = ("torch_xla is not importable in this environment; the XLA tests run in their own "
              "environment: scripts/setup_xla_env.sh && scripts/run_xla_tests.sh")
    if os.environ.get("ADVVIT_REQUIRE_XLA") == "1":
        raise RuntimeError(f"ADVVIT_REQUIRE_XLA=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)

import timm  # noqa: E402
import torch  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402

from advvit.engine import StepSettings, train_one_epoch  # noqa: E402
from advvit.losses import AdversarialLoss  # noqa: E402
from advvit.schedules import EpsSchedule  # noqa: E402

pytestmark = pytest.mark.xla

BATCH = 8
LOG_INTERVAL = 3
FIRST_STEP = LOG_INTERVAL  # the global step at the start: reads after the 3rd and 6th step
# Steps that may compile: the first (no optimizer state yet), the second (the state appears,
# the metric sums get their first additions), the third (sums added to sums, their first
# read), and the first step after a read (the metric temporaries the engine still holds, but
# no sums). Every step after that reuses a compiled graph, the second read included.
WARMUP = LOG_INTERVAL + 1
STEPS = 2 * LOG_INTERVAL + 2


@pytest.fixture(scope="module")
def rt() -> accel.Runtime:
    runtime = accel.setup("auto")
    yield runtime
    accel.cleanup(runtime)


def test_setup_auto_picks_xla_from_pjrt_env(rt: accel.Runtime) -> None:
    assert rt.kind == "xla"
    assert rt.device.type == "xla"
    assert (rt.rank, rt.world_size, rt.local_rank, rt.distributed) == (0, 1, 0, False)
    assert rt.is_main
    model = torch.nn.Linear(2, 2)
    assert accel.wrap_model(model, rt) is model  # no DDP on XLA: xm.optimizer_step reduces
    assert next(model.parameters()).device.type == "xla"
    assert accel.attack_model(model) is model


def _count(name: str) -> int:
    data = met.metric_data(name)
    return int(data[0]) if data else 0


def _counters(barrier_calls: list) -> dict:
    # Compilation happens inside sync(); execution is asynchronous, so wait for it before
    # reading the execution count.
    xm.wait_device_ops()
    return {"compiled": _count("CompileTime"), "executed": _count("ExecuteTime"),
            "to_host": _count("TransferFromDeviceTime"), "barriers": len(barrier_calls)}


@pytest.mark.parametrize("attack_steps", [1, 2], ids=["fgsm", "pgd2"])
def test_adversarial_training_steps_compile_once(rt: accel.Runtime, attack_steps: int) -> None:
    torch.manual_seed(0)
    # The thesis's XCiT-N12 at 32x32, cut to one XCA block (plus its two class-attention
    # blocks) to keep compile time down; still convolutional patch embedding with BatchNorm,
    # LPI, XCA and class attention.
    model = timm.create_model("xcit_nano_12_p16_224", img_size=32, num_classes=10, depth=1)
    model = accel.wrap_model(model, rt)
    before = [p.detach().cpu().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    barrier_calls: list = []

    def on_step() -> None:
        barrier_calls.append(1)
        accel.barrier(rt)

    # attack_mode="train": torch-xla 2.9 cannot back-propagate through BatchNorm in eval mode
    # ("size of offset factor is 0"), and XCiT has BatchNorm in its patch embedding and LPI.
    loss_fn = AdversarialLoss(eps=8 / 255, steps=attack_steps, attack_mode="train",
                              on_step=on_step)
    # A linear eps warm-up, started past step 0 (eps 0 skips the attack): eps differs at every
    # step, as in real training, and must not cause a recompile (it enters the graphs as data,
    # not as a constant).
    schedule = EpsSchedule(eps=8 / 255, shape="linear", warmup_steps=20)

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(BATCH, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(STEPS)]
    snapshots = [_counters(barrier_calls)]

    def loader():
        # The engine asks for the next batch only once the previous step is done (barrier and
        # metric bookkeeping included): the moment to read the counters.
        for batch in batches:
            yield batch
            snapshots.append(_counters(barrier_calls))

    logs: list = []
    totals, step = train_one_epoch(
        model=model, loss_fn=loss_fn, loader=loader(), optimizer=optimizer, rt=rt,
        eps_schedule=schedule, epoch=0, step=FIRST_STEP,
        settings=StepSettings(log_interval=LOG_INTERVAL),
        on_log=lambda s, metrics: logs.append((s, metrics)))

    assert step == FIRST_STEP + STEPS and len(snapshots) == STEPS + 1
    delta = {k: [b[k] - a[k] for a, b in zip(snapshots, snapshots[1:])] for k in snapshots[0]}

    # The barrier is called once per attack iteration...
    assert delta["barriers"] == [attack_steps] * STEPS
    # ... and really cuts the graph there: one graph per attack iteration, one for the update
    # (plus, at a log step, the small graph that reads the metric sums).
    read_steps = [s % LOG_INTERVAL == 0 for s in range(FIRST_STEP + 1, FIRST_STEP + STEPS + 1)]
    assert delta["executed"] == [attack_steps + 1 + r for r in read_steps], delta
    # Nothing is compiled after the warm-up steps.
    assert snapshots[WARMUP]["compiled"] > 0
    assert delta["compiled"][WARMUP:] == [0] * (STEPS - WARMUP), delta
    # Metrics never leave the device between log intervals; each read is one transfer.
    assert delta["to_host"] == [int(r) for r in read_steps], delta

    assert [s for s, _ in logs] == [FIRST_STEP + LOG_INTERVAL, FIRST_STEP + 2 * LOG_INTERVAL]
    assert [m["images_per_s"] > 0 for _, m in logs] == [True, True]
    for _, metrics in logs:
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        assert 0.0 <= metrics["train_adv_acc"] <= 1.0
    assert totals["steps"] == STEPS
    assert totals["eps"] == pytest.approx(schedule(FIRST_STEP + STEPS - 1))

    after = [p.detach().cpu() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no parameter was updated"


def _launched(index: int, path: str) -> None:
    rt = accel.setup("auto")
    total = accel.all_reduce_sum(torch.ones(2, device=rt.device) * (rt.rank + 1), rt)
    with open(path, "w") as f:
        f.write(f"{index} {rt.kind} {rt.rank} {rt.world_size} {os.getpid()} "
                f"{total.cpu().tolist()}")


def test_launch_xla_runs_fn_in_a_new_process(tmp_path) -> None:
    # The launcher must start before this process touches an XLA device (PJRT's rule), and
    # the tests above already did: launch from a fresh interpreter running this file.
    path = tmp_path / "launched.txt"
    proc = subprocess.run([sys.executable, __file__, "launch", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index, kind, rank, world, pid, total = path.read_text().split(" ", 5)
    # PJRT on the CPU has one device: one process, index 0, apart from the launching one.
    assert (index, kind, rank, world) == ("0", "xla", "0", "1")
    launcher_pid = int((tmp_path / "launched.txt.launcher").read_text())
    assert int(pid) not in (os.getpid(), launcher_pid)
    assert total == "[1.0, 1.0]"


if __name__ == "__main__" and sys.argv[1:2] == ["launch"]:
    with open(sys.argv[2] + ".launcher", "w") as f:
        f.write(str(os.getpid()))
    accel.launch_xla(_launched, args=(sys.argv[2],))


def test_train_cli_runs_on_xla_and_writes_a_loadable_checkpoint(tmp_path):
    """`python -m advvit.train --device xla` end to end: launch, train-mode attacks, save."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_data import make_idx_folder

    from advvit import checkpoint

    make_idx_folder(tmp_path / "data", n_train=24, n_test=8)
    argv = ["--device", "xla", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "data"),
            "--model", "xcit_nano_12_p16_224", "--img-size", "32", "--batch-size", "8",
            "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--workers", "0",
            "--max-steps-per-epoch", "2", "--eval-batches", "1", "--no-tensorboard",
            "--loss", "pgd", "--attack-steps", "2", "--eps", "8/255",
            "--min-lr", "0",  # lr_base scaled to a batch of 8 is below the default min_lr
            "--output", str(tmp_path / "runs"), "--experiment", "x"]
    proc = subprocess.run([sys.executable, "-m", "advvit.train", *argv], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = checkpoint.load_checkpoint(tmp_path / "runs" / "x" / "last.pth")
    assert state["step"] == 2 and state["spec"]["arch"] == "xcit_nano_12_p16_224"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
