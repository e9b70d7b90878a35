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

More than one device (each started in a fresh interpreter: PJRT launches before any device is
touched): ``accel.setup`` refuses several devices in one process; the all-reduce across two
PJRT CPU devices that blocks the multi-device test here is checked live; the multi-device
test itself (weights identical on every device and equal to one device on the whole batch,
summed metrics) runs where a host has one device per process, and skips on the CPU with the
reason (docs/architecture.md, accel).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
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
import torch.distributed as dist  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402
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


@pytest.mark.parametrize("arch, kwargs", [
    ("fan_tiny_12_p8_32", dict(depth=1)),               # FAN: BatchNorm in the stem and the MLP
    ("covit_d1_e128_p4_32", dict(embed_dim=48)),         # token convolution in place of attention
], ids=["fan", "covit"])
def test_seed_architectures_train_adversarially_on_xla(rt: accel.Runtime, arch: str,
                                                       kwargs: dict) -> None:
    """FAN and the conv-mixing ViT (cut down, for compile time) take FGSM-RS steps on XLA under
    the trainer's attack policy (train mode: eval-mode BatchNorm has no backward there)."""
    import advvit.models  # noqa: F401  (registers FAN and CoViT)
    torch.manual_seed(0)
    model = accel.wrap_model(timm.create_model(arch, img_size=32, num_classes=10, **kwargs), rt)
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    policy = accel.attack_policy(rt)
    assert policy.mode == "train"
    loss_fn = AdversarialLoss(eps=8 / 255, steps=1, attack_mode=policy.mode,
                              on_step=policy.on_step)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(BATCH, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(2)]
    totals, _ = train_one_epoch(
        model=model, loss_fn=loss_fn, loader=batches,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), rt=rt,
        eps_schedule=EpsSchedule(eps=8 / 255), epoch=0, step=0,
        settings=StepSettings(log_interval=1000))
    assert totals["steps"] == 2 and torch.isfinite(torch.tensor(totals["loss"]))
    unchanged = [n for n, p in model.named_parameters()
                 if p.requires_grad and torch.equal(before[n], p.detach().cpu())]
    assert not unchanged, f"parameters not updated on XLA: {unchanged[:5]}"


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


# --------------------------------------------------------------------------------------------
# more than one XLA device
# --------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_DEVICE = 4
MULTI_STEPS = 3
ON_CPU = os.environ.get("PJRT_DEVICE", "CPU") == "CPU"
CPU_LIMIT = (
    "PJRT_DEVICE=CPU forms a world of several devices only as threads of one process "
    "(torch_xla.launch runs one thread per CPU_NUM_DEVICES device), and there torch-xla 2.9's "
    "collectives never meet: each thread compiles its own executable, XLA's CPU runtime keys "
    "an all-reduce without a channel id by the HloModule's unique id, so the threads wait at "
    "rendezvous keys differing in op_id and the process aborts after 10 s "
    "(test_pjrt_cpu_collectives_across_devices_do_not_meet); torchrun gives every process a "
    "1-device world. advvit also refuses several devices per process "
    "(test_setup_refuses_several_devices_in_one_process). See docs/architecture.md, accel.")


TWO_CPU_DEVICES = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2"}


def _child_env(**extra: str) -> dict:
    # The checkout under test, not whichever advvit the environment has installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _all_reduce_in_every_thread(index: int, out: str) -> None:
    # torch-xla's own collective, nothing of advvit's: what the multi-device path stands on.
    total = xm.all_reduce(xm.REDUCE_SUM, torch.ones(2, device=torch_xla.device()) *
                          (xr.global_ordinal() + 1)).cpu().tolist()
    with open(f"{out}.{index}", "w") as f:
        f.write(str(total))


@pytest.mark.slow
def test_pjrt_cpu_collectives_across_devices_do_not_meet(tmp_path) -> None:
    """The evidence behind CPU_LIMIT, checked live: two PJRT CPU devices, one all-reduce.

    When a torch-xla release makes this all-reduce work, this test fails on purpose: then run
    the multi-device test below on the CPU as well (and see whether the thread-per-device
    refusal in accel.setup can go, which needs the loaders to shard by Runtime.rank).
    """
    out = tmp_path / "sum"
    proc = subprocess.run([sys.executable, __file__, "all_reduce", str(out)], capture_output=True,
                          text=True, timeout=300, env=_child_env(**TWO_CPU_DEVICES))
    log = proc.stdout + proc.stderr
    keys = set(re.findall(r"all reduce RendezvousKey\{[^}]*op_id=(\d+)\}", log))
    if proc.returncode == 0:
        sums = [(tmp_path / f"sum.{i}").read_text() for i in range(2)]
        pytest.fail(f"the all-reduce across two PJRT CPU devices works now (sums {sums}): "
                    "lift the CPU skip of test_two_xla_devices_train_like_one_on_the_whole_batch")
    # Aborted by XLA's rendezvous (not some other crash): one thread per op_id, two op_ids.
    assert "Termination timeout for `all reduce RendezvousKey" in log, log[-3000:]
    assert len(keys) == 2, log[-3000:]
    assert not list(tmp_path.glob("sum.*"))


def _setup_in_every_thread(index: int, out: str) -> None:
    try:
        accel.setup("xla")
        result = "no error"
    except accel.AccelError as err:
        result = f"AccelError: {err}"
    with open(f"{out}.{index}", "w") as f:
        f.write(f"{dist.is_initialized()} {result}")


@pytest.mark.slow
def test_setup_refuses_several_devices_in_one_process(tmp_path) -> None:
    # Two devices in one process (PJRT CPU's threads; TPU v2/v3's two cores per chip) would
    # share torch.distributed's one default group: both threads read one rank, and the samplers
    # hand them the same shard. setup says so instead, before any process group is made.
    out = tmp_path / "setup"
    proc = subprocess.run([sys.executable, __file__, "setup", str(out)], capture_output=True,
                          text=True, timeout=300, env=_child_env(**TWO_CPU_DEVICES))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for index in range(2):
        initialized, result = (tmp_path / f"setup.{index}").read_text().split(" ", 1)
        assert initialized == "False"
        assert result.startswith("AccelError: this process drives 2 XLA devices, one thread each")
        assert "CPU_NUM_DEVICES=1" in result and "same shard" in result


def _small_vit(seed: int) -> torch.nn.Module:
    # LayerNorm only (no BatchNorm): the per-device forward equals the whole-batch one.
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=2, num_classes=10)


def _train_steps(model: torch.nn.Module, rt: accel.Runtime, batches: list) -> dict:
    policy = accel.attack_policy(rt)
    # No random start: the attack is a function of each example and the weights, so the devices'
    # shards must give what one device gives on the whole batch.
    loss_fn = AdversarialLoss(eps=8 / 255, steps=2, random_init=False, attack_mode=policy.mode,
                              on_step=policy.on_step)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    metrics, _ = train_one_epoch(
        model=model, loss_fn=loss_fn, loader=batches, optimizer=optimizer, rt=rt,
        eps_schedule=EpsSchedule(eps=8 / 255), epoch=0, step=0,
        settings=StepSettings(log_interval=1000))
    return metrics


def _train_on_every_device(index: int, out: str) -> None:
    rt = accel.setup("xla")
    world = rt.world_size
    gen = torch.Generator().manual_seed(123)
    batches = [(torch.rand(world * PER_DEVICE, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (world * PER_DEVICE,), generator=gen))
               for _ in range(MULTI_STEPS)]
    model = accel.wrap_model(_small_vit(seed=0), rt)
    sharded = _train_steps(model, rt, [(x[rt.rank::world], y[rt.rank::world])
                                       for x, y in batches])
    # The reference: the whole batch on one device. Every device trains it, so the gradient
    # all-reduce inside xm.optimizer_step averages identical gradients, and its metrics are
    # read without reduction (a one-device runtime).
    alone = dataclasses.replace(rt, rank=0, world_size=1, distributed=False)
    reference = accel.wrap_model(_small_vit(seed=0), rt)
    whole = _train_steps(reference, alone, batches)
    local = torch.tensor([rt.rank + 1.0, 10.0 * (rt.rank + 1)], device=rt.device)
    meter = accel.DeviceMetrics(rt)
    meter.add(value=local[0], count=PER_DEVICE * (rt.rank + 1))
    result = {"rank": rt.rank, "world": world, "is_main": rt.is_main, "sharded": sharded,
              "whole": whole, "all_reduce_sum": accel.all_reduce_sum(local, rt).cpu().tolist(),
              "meter": meter.read()}
    torch.save({"sharded": {k: v.cpu() for k, v in model.state_dict().items()},
                "whole": {k: v.cpu() for k, v in reference.state_dict().items()}},
               f"{out}.{rt.rank}.pt")
    with open(f"{out}.{rt.rank}.json", "w") as f:
        f.write(json.dumps(result))
    accel.wait_for_all(rt)
    accel.cleanup(rt)


@pytest.mark.slow
@pytest.mark.skipif(ON_CPU, reason=CPU_LIMIT)
def test_two_xla_devices_train_like_one_on_the_whole_batch(tmp_path) -> None:
    """Every local XLA device (one process each) trains PGD-2 on its shard through the engine.

    Checked as tests/test_ddp.py does for DDP: the weights are bit-identical on every device
    and equal (to float tolerance) to one device trained on the whole batch; the engine's
    metrics and ``all_reduce_sum`` / ``DeviceMetrics.read`` are sums over the devices; rank 0
    alone is main. On a TPU host run it by itself (``scripts/run_xla_tests.sh -k two_xla``
    with ``PJRT_DEVICE=TPU``), so that this pytest process holds no TPU when it launches.
    """
    out = tmp_path / "rank"
    proc = subprocess.run([sys.executable, __file__, "multi", str(out)], capture_output=True,
                          text=True, timeout=900, env=_child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank.*.json"))]
    world = results[0]["world"]
    assert world >= 2 and [r["rank"] for r in results] == list(range(world))
    assert [r["is_main"] for r in results] == [True] + [False] * (world - 1)
    states = [torch.load(tmp_path / f"rank.{r}.pt") for r in range(world)]
    initial = _small_vit(seed=0).state_dict()
    moved = max((initial[k] - v).abs().max().item() for k, v in states[0]["sharded"].items())
    assert moved > 1e-3  # the comparisons below are not vacuous
    for name, tensor in states[0]["sharded"].items():
        for other in states[1:]:
            assert torch.equal(tensor, other["sharded"][name]), name
        torch.testing.assert_close(tensor, states[0]["whole"][name], rtol=1e-4, atol=2e-6,
                                   msg=name)
    total = [sum(i + 1.0 for i in range(world)), sum(10.0 * (i + 1) for i in range(world))]
    for r in results:
        assert r["sharded"]["steps"] == MULTI_STEPS
        assert r["sharded"]["loss"] == pytest.approx(r["whole"]["loss"], rel=1e-4)
        assert r["sharded"]["train_adv_acc"] == pytest.approx(r["whole"]["train_adv_acc"])
        assert r["all_reduce_sum"] == total
        assert r["meter"] == {"value": total[0], "count": PER_DEVICE * total[0]}


def _launch_and_record(out: str) -> None:
    with open(out + ".launcher", "w") as f:
        f.write(str(os.getpid()))
    accel.launch_xla(_launched, args=(out,))


if __name__ == "__main__":
    # A fresh interpreter per launch (PJRT's rule: launch before touching a device).
    mode, target = sys.argv[1:3]
    if mode == "launch":
        _launch_and_record(target)
    else:
        fn = {"all_reduce": _all_reduce_in_every_thread, "setup": _setup_in_every_thread,
              "multi": _train_on_every_device}[mode]
        accel.launch_xla(fn, args=(target,))
