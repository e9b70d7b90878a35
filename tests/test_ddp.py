"""Adversarial training under DistributedDataParallel: 2 processes, gloo, started by torchrun.

The test launches this file with ``python -m torch.distributed.run --nproc-per-node 2``; each
rank runs ``advvit.engine.train_one_epoch`` with PGD-2 adversarial training on its own shard of
a fixed batch, through ``accel.setup`` / ``wrap_model`` / ``attack_model``. Checked afterwards:

* the parameters are bit-identical on both ranks, and equal (to float tolerance) to one
  process training on the whole batch: data-parallel adversarial training computes the same
  thing as the single-process step (the attack is per-example, the DDP gradient is the mean);
* the attack never goes through the DDP wrapper (one wrapper forward per step, the training
  one) and never reaches DDP's gradient reducer (a counting communication hook sees exactly as
  many all-reduces per adversarial step as per clean step);
* metrics are summed over ranks: the engine's reduced loss and accuracy equal the
  single-process ones, and ``all_reduce_sum`` / ``DeviceMetrics.read`` equal the sum of what
  each rank contributed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

import pytest

import advvit  # noqa: F401  (before timm: the torchvision guard)
import torch
from torch import nn

from advvit import accel
from advvit.engine import StepSettings, train_one_epoch
from advvit.losses import AdversarialLoss, CleanLoss
from advvit.schedules import EpsSchedule

WORLD = 2
PER_RANK = 4
ADV_STEPS = 3
EPS = 8 / 255


# Small models with LayerNorm only, so the per-shard forward equals the full-batch one (a
# BatchNorm model would normalise each shard with its own statistics): a ViT and the
# convolution-mixing ViT (advvit.models.covit).
MODELS = {
    "vit": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                depth=2, num_heads=2),
    "covit": dict(model_name="covit_d2_e128_p4_32", embed_dim=48),
}
MODEL_ENV = "ADVVIT_TEST_DDP_MODEL"


def _model(seed: int, name: str) -> nn.Module:
    import timm

    import advvit.models  # noqa: F401  (registers covit)
    torch.manual_seed(seed)
    return timm.create_model(**MODELS[name], num_classes=10)


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """One clean step and ADV_STEPS adversarial steps of WORLD * PER_RANK examples each."""
    gen = torch.Generator().manual_seed(123)
    return [(torch.rand(WORLD * PER_RANK, 3, 32, 32, generator=gen),
             torch.randint(0, 10, (WORLD * PER_RANK,), generator=gen))
            for _ in range(1 + ADV_STEPS)]


def _train(model: nn.Module, rt: accel.Runtime, clean_batches: Iterable,
           adv_batches: Iterable, on_step: Callable[[], None]) -> Tuple[Dict[str, float], ...]:
    """A clean step, then PGD-2 adversarial steps, through the engine; returns both metrics.

    No random start: the attack is then a deterministic function of each example and the
    weights, so one process on the whole batch must reproduce what the ranks do on shards.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    settings = StepSettings(log_interval=1000)
    clean, step = train_one_epoch(
        model=model, loss_fn=CleanLoss(), loader=clean_batches, optimizer=optimizer, rt=rt,
        eps_schedule=EpsSchedule(eps=0.0), epoch=0, step=0, settings=settings)
    adv_loss = AdversarialLoss(eps=EPS, steps=2, random_init=False, on_step=on_step)
    adv, _ = train_one_epoch(
        model=model, loss_fn=adv_loss, loader=adv_batches, optimizer=optimizer, rt=rt,
        eps_schedule=EpsSchedule(eps=EPS), epoch=0, step=step, settings=settings)
    return clean, adv


def _worker(out: Path) -> None:
    """One torchrun rank."""
    torch.set_num_threads(1)  # two ranks share the machine's cores
    rt = accel.setup("cpu")
    assert rt.kind == "cpu" and rt.distributed and rt.world_size == WORLD, rt
    assert rt.rank == int(os.environ["RANK"]) and rt.local_rank == int(os.environ["LOCAL_RANK"])

    # Each rank starts from different weights: DDP must broadcast rank 0's.
    model = accel.wrap_model(_model(seed=rt.rank, name=os.environ[MODEL_ENV]), rt)
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    assert accel.attack_model(model) is model.module

    reductions: List[int] = [0]

    def counting_allreduce(state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        reductions[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_allreduce)
    # Calls through the DDP wrapper: each runs DDP's forward pre-processing (buffer broadcast
    # from rank 0, arming the reducer). The attack must not go through it.
    wrapper_calls: List[int] = [0]
    model.register_forward_pre_hook(lambda module, args: wrapper_calls.__setitem__(
        0, wrapper_calls[0] + 1))

    shard = [(x[rt.rank::WORLD], y[rt.rank::WORLD]) for x, y in _batches()]
    per_step: List[int] = []

    wrapper_per_step: List[int] = []

    def loader(batches):
        for batch in batches:
            before, calls_before = reductions[0], wrapper_calls[0]
            yield batch
            per_step.append(reductions[0] - before)
            wrapper_per_step.append(wrapper_calls[0] - calls_before)

    attack_iterations: List[int] = []
    clean, adv = _train(model, rt, loader(shard[:1]), loader(shard[1:]),
                        on_step=lambda: (attack_iterations.append(1), accel.barrier(rt)))

    # Reductions with rank-dependent values, checked against the sum in the parent.
    local = torch.tensor([rt.rank + 1.0, 10.0 * (rt.rank + 1), float(rt.rank == 0)])
    meter = accel.DeviceMetrics(rt)
    meter.add(value=local[0], count=PER_RANK * (rt.rank + 1))
    meter.add(value=local[1])
    result = {
        "rank": rt.rank, "world_size": rt.world_size, "clean": clean, "adv": adv,
        "reductions_per_step": per_step, "wrapper_calls_per_step": wrapper_per_step,
        "attack_iterations": len(attack_iterations),
        "local": local.tolist(), "all_reduce_sum": accel.all_reduce_sum(local, rt).tolist(),
        "local_is_untouched": local.tolist(), "meter_local": [local[0].item() + local[1].item(),
                                                              PER_RANK * (rt.rank + 1)],
        "meter": meter.read(),
    }
    torch.save(model.module.state_dict(), out / f"rank{rt.rank}.pt")
    (out / f"rank{rt.rank}.json").write_text(json.dumps(result))
    accel.wait_for_all(rt)
    accel.cleanup(rt)
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_two_process_gloo_adversarial_training(tmp_path: Path, model_name: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={WORLD}", __file__, str(tmp_path)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env[MODEL_ENV] = model_name
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD))
    assert all(r["world_size"] == WORLD for r in results)

    # Identical parameters on every rank (DDP's all-reduced gradients are bit-identical).
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name

    # The same training in one process on the whole batch, from rank 0's initial weights.
    torch.set_num_threads(1)
    reference = _model(seed=0, name=model_name)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    single = accel.setup("cpu")
    assert not single.distributed
    batches = _batches()
    ref_clean, ref_adv = _train(reference, single, batches[:1], batches[1:],
                                on_step=lambda: accel.barrier(single))
    moved = max((initial[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    assert moved > 1e-3  # the comparison below is not vacuous
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(states[0][name], tensor, rtol=1e-4, atol=2e-6, msg=name)

    for r in results:
        # Each rank attacked its own shard: 2 iterations per adversarial step, through the
        # un-wrapped module, so the reducer ran once per optimizer step, never for the attack.
        assert r["attack_iterations"] == 2 * ADV_STEPS
        clean_reductions = r["reductions_per_step"][0]
        assert clean_reductions >= 1
        assert r["reductions_per_step"] == [clean_reductions] * (1 + ADV_STEPS)
        # ... and the wrapper ran only the training forward of each step.
        assert r["wrapper_calls_per_step"] == [1] * (1 + ADV_STEPS)
        # The engine's metrics are summed over ranks: those of the whole batch.
        assert r["adv"]["steps"] == ADV_STEPS
        for got, want in ((r["clean"], ref_clean), (r["adv"], ref_adv)):
            assert got.keys() >= {"loss"} and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            for key in ("train_adv_acc", "train_clean_acc"):
                assert got.get(key) == pytest.approx(want.get(key))

    # all_reduce_sum and DeviceMetrics.read give the sum of every rank's contribution.
    total = [sum(values) for values in zip(*(r["local"] for r in results))]
    meter_total = [sum(values) for values in zip(*(r["meter_local"] for r in results))]
    for r in results:
        assert r["all_reduce_sum"] == total
        assert r["local_is_untouched"] == r["local"]
        assert [r["meter"]["value"], r["meter"]["count"]] == meter_total
    assert total == [3.0, 30.0, 1.0]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
