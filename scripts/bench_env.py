"""What every benchmark records about its machine, and how it writes its tables (stdlib only, so
scripts that must not import torch before configuring it can use it)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_text(path: Optional[str], text: str) -> None:
    """Write ``text`` to ``path`` (folders created); nothing when ``path`` is empty."""
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
