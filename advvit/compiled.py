"""``torch.compile`` for evaluations: whether it can run here, the compiled model, and what
compiling did (frames compiled, graph breaks, recompiles and why) from dynamo's counters.

The check runs before any work, so ``--compile`` on a machine that cannot compile is one error
line naming the option and the fix, not a traceback in the middle of an attack::

    check_compile(device)                      # OptionError where torch.compile cannot run
    model = compile_model(model)               # once; every batch, attack and threat calls it
    before = DynamoCounters.now()
    ...                                        # the attacks
    report["compile"] = DynamoCounters.now().since(before)
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .io import OptionError

__all__ = ["check_compile", "compile_model", "DynamoCounters", "BATCH_SIZE_REASON"]

BATCH_SIZE_REASON = "size mismatch at index 0"
"""How dynamo's guard-failure reason names a changed batch size (the inputs' first dimension)."""


def _cpp_compilers() -> tuple[str, ...]:
    """The C++ compilers inductor's CPU back end searches, by name (its ``None`` entry means a
    conda download it makes only when asked to, so it is not counted)."""
    from torch._inductor import config
    cxx = config.cpp.cxx
    return tuple(c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c)


def check_compile(device: torch.device, option: str = "--compile") -> None:
    """Whether ``torch.compile`` (inductor) can compile a model for ``device``; no compile runs
    (on the CPU one costs seconds even for one layer).

    Raises:
        OptionError: naming ``option`` and the fix: a Python dynamo does not support, a device
            other than cpu or cuda, no C++ compiler for the CPU back end, no triton for CUDA.
    """
    import torch._dynamo
    if not torch._dynamo.is_dynamo_supported():
        raise OptionError(f"{option}: torch.compile does not run on this Python: drop {option}")
    if device.type == "cpu":
        names = _cpp_compilers()
        if not any(shutil.which(n) for n in names):
            raise OptionError(f"{option}: torch.compile's CPU back end needs a C++ compiler and "
                              f"none of {', '.join(names) or 'g++'} is on PATH: install one "
                              f"(apt-get install g++, or set CXX) or drop {option}")
    elif device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise OptionError(f"{option}: torch.compile on CUDA needs triton: pip install "
                              f"triton (the version torch names) or drop {option}")
    else:
        raise OptionError(f"{option} compiles for cpu and cuda, not {device.type}: drop "
                          f"{option}")


def compile_model(model: nn.Module) -> nn.Module:
    """``model`` compiled with torch.compile's defaults (inductor, automatic dynamic shapes).

    Not ``dynamic=False``: AutoAttack's attacks call the model on the examples still robust, a
    batch size per call, and a static graph per size would exhaust dynamo's cache and fall back
    to eager without a word. With the defaults the first changed batch size recompiles once
    with the batch dimension symbolic, and later sizes reuse that graph.
    """
    return torch.compile(model)


def _graph_breaks(counters: Mapping[str, Mapping[str, int]]) -> int:
    return int(sum(counters.get("graph_break", {}).values()))


@dataclass(frozen=True)
class DynamoCounters:
    """A snapshot of dynamo's process-wide counters; :meth:`since` gives what happened between
    two snapshots.

    Attributes:
        frames: frames compiled (``counters["frames"]["ok"]``).
        given_up: frames dynamo tried and gave up on (``total`` - ``ok``: a compile error, or
            dynamo's recompile limit reached), whose calls run eagerly.
        graph_breaks: graph breaks, summed over their reasons.
        reasons: the guard-failure reasons recorded so far, in order.
    """

    frames: int
    given_up: int
    graph_breaks: int
    reasons: tuple[str, ...]

    @classmethod
    def now(cls) -> "DynamoCounters":
        """The counters as they are now."""
        from torch._dynamo.utils import counters, guard_failures
        reasons = tuple(r for code_reasons in list(guard_failures.values()) for r in code_reasons)
        frames = counters["frames"]
        ok = int(frames.get("ok", 0))
        return cls(ok, int(frames.get("total", 0)) - ok, _graph_breaks(counters), reasons)

    def since(self, before: "DynamoCounters") -> dict[str, Any]:
        """What compiling did between ``before`` and this snapshot, for a report.

        A recompile records one guard-failure reason per cached graph of the frame, each
        prefixed with that graph's compile id ``frame/n``; the frame's first graph (``/0``) is
        always among them, so its reasons count the recompiles, and those naming the first
        dimension count the recompiles a changed batch size caused.
        """
        seen = list(before.reasons)
        new = list(self.reasons)
        for r in seen:  # the reasons added since, whatever the order of the codes
            if r in new:
                new.remove(r)
        firsts = [r for r in new if r.split(":", 1)[0].endswith("/0")]
        return {"frames_compiled": self.frames - before.frames,
                "frames_run_eagerly": self.given_up - before.given_up,
                "graph_breaks": self.graph_breaks - before.graph_breaks,
                "recompiles": len(firsts),
                "recompiles_batch_size": sum(BATCH_SIZE_REASON in r for r in firsts),
                "recompile_reasons": sorted(set(firsts)),
                "note": "torch.compile (inductor, automatic dynamic shapes): the first batch "
                        "of a new size recompiles once with the batch dimension symbolic; "
                        "a change of autocast state (--amp: the attack and the fp32 check) "
                        "compiles a graph of its own, as do grad mode and whether the input "
                        "needs a gradient; frames_run_eagerly counts frames dynamo gave up on "
                        "(its recompile limit): their calls ran eagerly, as correct but slower"}
