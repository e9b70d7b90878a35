"""Shared helpers for the benchmark scripts: environment facts, interleaved timing, memory, steps.

Timing rule: variants are measured side by side in one process, round-robin over several rounds
(the starting variant rotates each round), and each variant's median per-step time is reported, so
that load changes on a shared machine hit every variant alike. Ratios are taken between medians.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cpu_model  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence

# advvit must be imported before timm (it installs the torchvision guard on CPU-only installs).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import advvit  # noqa: E402,F401
import advvit.models  # noqa: E402,F401  (registers the thesis variants with timm)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------

def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    """Facts to record next to every table: machine, versions, date, command."""
    import timm
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "git_commit": git_commit(),
    }
    try:
        import torchattacks
        env["torchattacks"] = torchattacks.__version__
    except ImportError:
        env["torchattacks"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: Optional[str]):
    if amp in (None, "", "none"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------------
# Models and data
# ------------------------------------------------------------------------------------------------

def build_model(arch: str, *, img_size: int, num_classes: int, device: torch.device,
                channels_last: bool = False, **model_kwargs) -> nn.Module:
    model = advvit.models.create_model(arch, num_classes=num_classes, img_size=img_size,
                                       **model_kwargs)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def random_batch(batch: int, img_size: int, num_classes: int, device: torch.device, seed: int = 0,
                 channels_last: bool = False, in_chans: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, in_chans, img_size, img_size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    x, y = x.to(device), y.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def adamw(model: nn.Module, *, fused: bool = False) -> torch.optim.Optimizer:
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kw)


# ------------------------------------------------------------------------------------------------
# Steps. Each maker returns ``step(x, y) -> None``: one whole training step, or one reference piece.
# ------------------------------------------------------------------------------------------------

Step = Callable[[torch.Tensor, torch.Tensor], None]


def advvit_step(model: nn.Module, opt: torch.optim.Optimizer, loss_mod: nn.Module,
                amp_ctx: Callable) -> Step:
    """advvit's loss forward + backward + AdamW step, as the trainer runs it."""
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with amp_ctx():
            out = loss_mod(model, x, y)
        out.loss.backward()
        opt.step()
    return step


class _Frozen:
    """The least work that freezing needs: flip requires_grad and the mode, nothing else."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)
        self.model.eval()

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        self.model.train()


def floor_step(model: nn.Module, opt: torch.optim.Optimizer, *, k: int, extra_clean_forward: bool,
               train_forwards: int, amp_ctx: Callable) -> Step:
    """The floor of an adversarial step, from primitives only.

    k forward + input-gradient passes with frozen parameters in eval mode (no projection, no random
    start, no checks), optionally one no-grad eval forward (TRADES's clean target), then one
    training step over ``train_forwards`` forwards (1; 2 for TRADES: clean and adversarial).
    """
    frozen = _Frozen(model)

    def step(x, y):
        if k:
            with frozen:
                for _ in range(k):
                    xi = x.detach().requires_grad_(True)
                    with amp_ctx():
                        loss = F.cross_entropy(model(xi).float(), y, reduction="sum")
                    torch.autograd.grad(loss, xi)
                if extra_clean_forward:
                    with torch.no_grad(), amp_ctx():
                        model(x)
        opt.zero_grad(set_to_none=True)
        with amp_ctx():
            loss = sum(F.cross_entropy(model(x), y) for _ in range(train_forwards))
        loss.backward()
        opt.step()
    return step


def attack_only_floor(model: nn.Module, *, amp_ctx: Callable) -> Step:
    """One forward + input gradient with frozen parameters in eval mode (the attack's floor)."""
    frozen = _Frozen(model)

    def step(x, y):
        with frozen:
            xi = x.detach().requires_grad_(True)
            with amp_ctx():
                loss = F.cross_entropy(model(xi).float(), y, reduction="sum")
            torch.autograd.grad(loss, xi)
    return step


def _kl_batchmean(adv_logits, clean_prob):
    return F.kl_div(F.log_softmax(adv_logits.float(), dim=1), clean_prob, reduction="batchmean")


def thesis_step(model: nn.Module, opt: torch.optim.Optimizer, *, kind: str, steps: int, eps: float,
                amp_ctx: Callable, beta: float = 6.0) -> Step:
    """A straightforward loop in the public thesis code's style.

    The attack runs in eval mode with the parameters left trainable (requires_grad True); the input
    gradient comes from ``loss.backward()`` (which also fills parameter gradients), read from
    ``x_adv.grad``, after which the parameter gradients are zeroed. Random start uniform in the ball
    (+1e-5), step 1.5 * eps / steps, projection by clamping. Then, in train mode, a grad-enabled
    clean forward (for the reported clean logits) and the adversarial forward; the loss on the
    adversarial logits (TRADES: CE(clean) + beta * KL) is back-propagated and AdamW steps.
    """
    alpha = 1.5 * eps / steps

    def attack(x, y, clean_prob=None):
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps) + 1e-5)
        x_adv = torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), 0, 1).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with amp_ctx():
                logits = model(x_adv)
            if clean_prob is None:
                loss = F.cross_entropy(logits.float(), y)
            else:
                loss = F.kl_div(F.log_softmax(logits.float(), dim=1), clean_prob, reduction="sum")
            loss.backward()
            grad = x_adv.grad
            opt.zero_grad(set_to_none=True)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), 0, 1).detach()
        return x_adv

    def step(x, y):
        model.eval()
        if kind == "trades":
            with amp_ctx():
                clean_out = model(x)  # grad-enabled, as in the public code
            x_adv = attack(x, y, F.softmax(clean_out.float(), dim=1).detach())
        else:
            x_adv = attack(x, y)
        model.train()
        opt.zero_grad(set_to_none=True)
        with amp_ctx():
            logits, logits_adv = model(x), model(x_adv)
        if kind == "trades":
            loss = F.cross_entropy(logits, y) + beta * _kl_batchmean(
                logits_adv, F.softmax(logits.float(), dim=1))
        else:
            loss = F.cross_entropy(logits_adv, y)
        loss.backward()
        opt.step()
    return step


def torchattacks_step(model: nn.Module, opt: torch.optim.Optimizer, *, kind: str, steps: int,
                      eps: float, amp_ctx: Callable, beta: float = 6.0) -> Optional[Step]:
    """A loop on torchattacks: FFGSM (FGSM-RS), PGD, TPGD (TRADES's KL attack), then train.

    Returns None when torchattacks is not installed.
    """
    try:
        import torchattacks
    except ImportError:
        return None
    alpha = 1.5 * eps / steps
    if kind == "trades":
        atk = torchattacks.TPGD(model, eps=eps, alpha=alpha, steps=steps)
    elif steps == 1:
        atk = torchattacks.FFGSM(model, eps=eps, alpha=alpha)
    else:
        atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

    def step(x, y):
        with amp_ctx():
            x_adv = atk(x, y)  # eval mode during the attack, restored afterwards
        opt.zero_grad(set_to_none=True)
        with amp_ctx():
            if kind == "trades":
                logits, logits_adv = model(x), model(x_adv)
                loss = F.cross_entropy(logits, y) + beta * _kl_batchmean(
                    logits_adv, F.softmax(logits.float(), dim=1))
            else:
                loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        opt.step()
    return step


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def interleaved_times(variants: Dict[str, Step], batch_for: Callable[[str], tuple], *,
                      device: torch.device, rounds: int, iters: int, warmup: int,
                      log: Callable[[str], None] = lambda s: None) -> Dict[str, dict]:
    """Median seconds per step of each variant, measured round-robin in one process.

    Each round runs every variant ``iters`` times (timed together, divided by ``iters``); the
    starting variant rotates from round to round. ``warmup`` untimed calls per variant come first.
    """
    names = list(variants)
    for name in names if warmup else ():
        x, y = batch_for(name)
        for _ in range(warmup):
            variants[name](x, y)
        sync(device)
        log(f"  warmed up {name}")
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            x, y = batch_for(name)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                variants[name](x, y)
            sync(device)
            samples[name].append((time.perf_counter() - t0) / iters)
        log(f"  round {r + 1}/{rounds} done")
    return {n: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
                "samples_s": s} for n, s in samples.items()}


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(step: Step, x, y, device: torch.device) -> dict:
    """Peak memory of one step above what is live before it (after one warm-up step).

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step.
    CPU: the process's peak resident set (VmHWM) minus its resident set before the step, with the
    peak reset through /proc/self/clear_refs and freed heap returned to the system first; run each
    case in a fresh process so that cases do not share allocator state.
    """
    step(x, y)  # optimizer state, lazy buffers and kernels exist from here on
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(x, y)
        sync(device)
        return {"method": "torch.cuda.max_memory_allocated - allocated before the step",
                "peak_mib": (torch.cuda.max_memory_allocated(device) - base) / 2**20}
    _release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _proc_status_kib("VmRSS")
    step(x, y)
    peak = _proc_status_kib("VmHWM")
    return {"method": "peak RSS (VmHWM after clear_refs) - RSS before the step, fresh process",
            "peak_mib": (peak - base) / 1024}


def fmt_table(header: Sequence[str], rows: Sequence[Sequence], aligns: str = "") -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(("---:" if (aligns and aligns[i] == "r") else "---")
                          for i in range(len(header))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)
