"""advvit.accel in one CPU process: device choice, errors, launcher environment, metric sums.

The multi-process paths run for real in tests/test_ddp.py (torchrun, gloo) and tests/test_xla.py
(torch-xla on PJRT CPU).
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from advvit import accel

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PJRT_DEVICE")


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_setup_single_process_cpu():
    rt = accel.setup("cpu")
    assert rt == accel.Runtime(kind="cpu", device=torch.device("cpu"))
    assert rt.is_main and not rt.distributed and not dist.is_initialized()
    accel.barrier(rt)  # a no-op off XLA
    accel.wait_for_all(rt)
    accel.cleanup(rt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_without_gpu_or_pjrt_is_cpu():
    assert accel.setup("auto").kind == "cpu"


@pytest.mark.skipif(accel.xla_available(), reason="checks the fallback where torch_xla is absent")
def test_auto_with_pjrt_but_no_torch_xla_warns_and_falls_back(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    with pytest.warns(RuntimeWarning, match="torch_xla cannot be imported"):
        rt = accel.setup("auto")
    assert rt.kind == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(accel.xla_available(), reason="checks the error where torch_xla is absent")
def test_xla_without_torch_xla_says_how_to_install():
    with pytest.raises(accel.AccelError) as info:
        accel.setup("xla")
    message = str(info.value)
    assert "pip install advvit[xla]" in message and "torch==2.9.0" in message
    assert torch.__version__ in message
    assert not accel.xla_available()
    with pytest.raises(accel.AccelError, match="torch-xla"):
        accel.launch_xla(print)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(accel.AccelError, match="CUDA is not available.*device='cpu'"):
        accel.setup("cuda")


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="one of"):
        accel.setup("tpu")


def test_distributed_env_without_rendezvous_address_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(accel.AccelError, match="MASTER_ADDR, MASTER_PORT.*torchrun"):
        accel.setup("cpu")
    assert not dist.is_initialized()


@pytest.mark.parametrize("rank, world", [("2", "2"), ("0", "0"), ("x", "2")])
def test_inconsistent_torchrun_env_is_rejected(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(accel.AccelError):
        accel.setup("cpu")


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank (what ``setup`` joins under torchrun)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_existing_group_is_used_and_left_to_its_owner(one_rank_group):
    rt = accel.setup("cpu")
    assert (rt.rank, rt.world_size, rt.owns_process_group) == (0, 1, False)
    accel.cleanup(rt)
    assert dist.is_initialized()  # not ours to destroy


def test_attack_model_strips_ddp_only(one_rank_group):
    inner = nn.Linear(3, 2)
    ddp = nn.parallel.DistributedDataParallel(inner)
    assert accel.attack_model(ddp) is inner
    assert accel.attack_model(inner) is inner
    wrapped = nn.Sequential(inner)  # e.g. a normalisation wrapper: the attack needs it
    assert accel.attack_model(wrapped) is wrapped


@pytest.mark.slow
def test_one_unwrap_strips_what_each_caller_needs(one_rank_group):
    from advvit.models import NormalizedModel, unwrap
    from advvit.checkpoint import _model_normalization

    timm_model = nn.Linear(3, 2)
    normalized = NormalizedModel(timm_model, (0.5,) * 3, (0.25,) * 3)
    compiled = torch.compile(normalized)  # an OptimizedModule; nothing compiles until called
    ddp = nn.parallel.DistributedDataParallel(compiled)
    outer = torch.compile(ddp)
    for model, parallel in [(timm_model, timm_model), (normalized, normalized),
                            (compiled, compiled), (ddp, compiled), (outer, compiled),
                            (nn.DataParallel(normalized), normalized)]:
        # Attacks: DDP (and a compile around it) off, the compiled inner module kept.
        assert unwrap(model, "parallel") is parallel is accel.attack_model(model)
        # The model as create_model built it, then the timm model whose weights are stored.
        assert unwrap(model, "runtime") is (timm_model if model is timm_model else normalized)
        assert unwrap(model) is unwrap(model, "all") is timm_model
        assert _model_normalization(model) == (None if model is timm_model else
                                               ((0.5,) * 3, (0.25,) * 3))
    with pytest.raises(ValueError, match="strip must be one of"):
        unwrap(timm_model, "ddp")


def test_wrap_model_single_process_moves_without_wrapping():
    rt = accel.setup("cpu")
    model = nn.Linear(3, 2)
    assert accel.wrap_model(model, rt) is model


def test_optimizer_step_clips_the_global_norm():
    rt = accel.setup("cpu")
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.weight.grad = torch.full_like(model.weight, 3.0)  # norm 6
    accel.optimizer_step(optimizer, rt, clip_grad=1.0)
    assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 4), -0.5))
    model.weight.grad = torch.full_like(model.weight, 3.0)
    accel.optimizer_step(optimizer, rt)  # no clipping: a plain step
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 4), -3.5))


def test_all_reduce_sum_single_process_is_identity():
    rt = accel.setup("cpu")
    t = torch.arange(3.0)
    assert accel.all_reduce_sum(t, rt) is t


def test_device_metrics_sum_tensors_and_numbers_until_read():
    rt = accel.setup("cpu")
    meter = accel.DeviceMetrics(rt)
    assert meter.read() == {}
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    y = torch.tensor([0, 0, 0])
    for _ in range(2):
        meter.add(correct=(logits.argmax(1) == y).sum(), loss=torch.tensor([0.5, 0.25]),
                  count=len(y))
    assert meter.names() == ["correct", "count", "loss"]
    assert meter.read(reset=False) == {"correct": 4.0, "count": 6.0, "loss": 1.5}
    sums = meter.read()
    assert sums == {"correct": 4.0, "count": 6.0, "loss": 1.5}
    assert all(isinstance(v, float) for v in sums.values())
    assert meter.read() == {}  # read() reset the sums
    meter.add(count=2)
    assert meter.read() == {"count": 2.0}


def test_device_metrics_keep_sums_on_the_device_and_detached():
    rt = accel.setup("cpu")
    meter = accel.DeviceMetrics(rt)
    w = torch.ones(2, requires_grad=True)
    meter.add(loss=(w * 2).sum())
    (stored,) = meter._sums.values()
    assert not stored.requires_grad and stored.dtype == torch.float64
    assert meter.read() == {"loss": 4.0}


def test_device_metrics_reject_a_name_changing_kind():
    meter = accel.DeviceMetrics(accel.setup("cpu"))
    meter.add(count=1)
    with pytest.raises(ValueError, match="count"):
        meter.add(count=torch.tensor(1.0))


def test_optimizer_step_clips_by_value_through_timm():
    rt = accel.setup("cpu")
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([5.0, -0.1, -7.0])
    opt = torch.optim.SGD([w], lr=1.0)
    accel.optimizer_step(opt, rt, clip_grad=0.5, clip_mode="value")
    torch.testing.assert_close(w.detach(), torch.tensor([-0.5, 0.1, 0.5]))


# --------------------------------------------------------------------------------------------
# the attack policy: decided once, in accel, for training, evaluation and the overfitting check
# --------------------------------------------------------------------------------------------

# An XLA runtime whose tensors stay on the CPU: the policy only looks at the kind, and the XLA
# sync it would run is replaced by a counter, so this checks the wiring without torch_xla.
XLA_ON_CPU = accel.Runtime(kind="xla", device=torch.device("cpu"))


@pytest.fixture
def xla_syncs(monkeypatch):
    calls: list = []
    monkeypatch.setattr(accel, "_xla_sync", lambda: calls.append(1))
    return calls


class ModeProbe(nn.Module):
    """A linear classifier that records whether it was in train mode at each forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 3)
        self.modes: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.fc(x.flatten(1))


def test_attack_policy_is_train_mode_and_the_step_barrier_on_xla_only(xla_syncs):
    assert accel.attack_policy(accel.setup("cpu")) == accel.AttackPolicy(mode="eval", on_step=None)
    assert accel.attack_policy(None) == accel.AttackPolicy(mode="eval", on_step=None)
    policy = accel.attack_policy(XLA_ON_CPU)
    assert policy.mode == "train"
    policy.on_step()
    assert xla_syncs == [1]


@pytest.mark.parametrize("loss", ["pgd", "trades"])
def test_training_losses_follow_the_policy(loss, xla_syncs):
    from advvit.config import load_config
    from advvit.trainer import _build_loss

    cfg = load_config(["--dataset", "fashion_mnist", "--loss", loss, "--attack-steps", "2"])
    on_cpu = _build_loss(cfg, accel.setup("cpu"))
    assert (on_cpu.attack_mode, on_cpu.on_step) == ("eval", None)
    on_xla = _build_loss(cfg, XLA_ON_CPU)
    assert on_xla.attack_mode == "train"
    on_xla.on_step()
    assert xla_syncs == [1]


@pytest.mark.parametrize("rt, attack_modes, syncs", [
    (accel.Runtime(kind="cpu", device=torch.device("cpu")), [False, False], 0),
    (XLA_ON_CPU, [True, True], 2),
], ids=["cpu", "xla"])
def test_evaluation_and_overfitting_check_attack_as_the_policy_says(rt, attack_modes, syncs,
                                                                    xla_syncs):
    from advvit.engine import evaluate
    from advvit.trainer import CatastrophicOverfittingGuard

    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    model = ModeProbe().train()
    # The clean forward, the two attack iterations, the forward on the adversarial examples.
    evaluate(model, [(x, y)], rt=rt, attack=dict(eps=0.1, steps=2))
    assert model.modes == [False, *attack_modes, False]
    assert len(xla_syncs) == syncs + (1 if rt.kind == "xla" else 0)  # + the per-batch barrier
    assert model.training  # given back as it came

    model.modes.clear()
    xla_syncs.clear()
    guard = CatastrophicOverfittingGuard((x, y), eps=0.1, steps=2, norm="linf", drop=0.5)
    acc, collapsed = guard.check(model, rt)
    assert model.modes == [*attack_modes, False] and len(xla_syncs) == syncs
    assert 0.0 <= acc <= 1.0 and not collapsed and model.training


def test_evaluation_restores_every_submodule_mode_and_counts_in_eval_mode():
    from advvit.engine import evaluate, robust_accuracy

    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    model = ModeProbe().train()
    model.fc.eval()  # e.g. a frozen part: its own mode must survive
    rt = accel.setup("cpu")
    robust_accuracy(model, x, y, eps=0.1, steps=1, rt=rt)
    assert model.modes == [False, False]  # the attack and the count, both in eval mode
    assert model.training and not model.fc.training
    evaluate(model, [(x, y)], rt=rt, attack=dict(eps=0.1, steps=1))
    assert model.training and not model.fc.training


# --------------------------------------------------------------------------------------------
# CPU threads
# --------------------------------------------------------------------------------------------

@pytest.fixture
def _threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, expected", [({0}, 1), ({0, 1}, 1), ({0, 1, 2, 3}, 3),
                                             (set(range(16)), 15)])
def test_auto_threads_are_the_usable_cores_minus_one(monkeypatch, cores, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(accel.os, "sched_getaffinity", lambda pid: cores, raising=False)
    assert accel.usable_cores() == len(cores)
    assert accel.resolve_threads("auto") == expected == accel.resolve_threads()


def test_auto_threads_respect_omp_num_threads(monkeypatch):
    monkeypatch.setattr(accel.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert accel.resolve_threads("auto") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # nested levels: torch's pool is the first
    assert accel.resolve_threads("AUTO") == 4
    assert accel.resolve_threads(2) == 2 and accel.resolve_threads("5") == 5  # explicit wins
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.warns(RuntimeWarning, match="OMP_NUM_THREADS"):
        assert accel.resolve_threads("auto") == 7


@pytest.mark.parametrize("bad", [0, -1, "0", "x", "2.5", 2.5, True, None, "", [2]])
def test_bad_threads_name_the_key(bad):
    with pytest.raises(accel.ThreadsError) as err:
        accel.resolve_threads(bad, key="threads")
    assert err.value.key == "threads" and str(err.value).startswith("threads: expected auto")


def test_apply_threads_reaches_torch(_threads_kept):
    assert accel.apply_threads(1) == 1 and torch.get_num_threads() == 1
    assert accel.apply_threads("2") == 2 and torch.get_num_threads() == 2
    facts = accel.thread_facts()
    assert facts["torch_threads"] == 2 and facts["usable_cores"] >= 1
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_threads_option_parses_and_refuses_with_its_name(capsys):
    import argparse
    parser = argparse.ArgumentParser()
    accel.add_threads_option(parser)
    assert parser.parse_args([]).threads == "auto"
    assert parser.parse_args(["--threads", "3"]).threads == 3
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--threads", "0"])
    assert exit_.value.code == 2
    assert "argument --threads: expected auto or a positive integer, got '0'" in \
        capsys.readouterr().err
