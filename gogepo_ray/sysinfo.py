"""What a benchmark figure depends on: the CPU, its bf16 units, and the thread setting.

Every bench JSON carries ``cpu_info()``, and ``learner.precision: auto`` reads
``bf16_pays()``: bf16 is only faster where the hardware has bf16 arithmetic.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_flags() -> list[str]:
    """The CPU's bf16-related feature flags, which decide whether bf16 pays off."""
    return sorted(cpu_flags() & set(BF16_FLAGS))


def bf16_pays(device: str) -> bool:
    """bf16 arithmetic is faster than fp32 here: a GPU, or a CPU with AMX or AVX512-BF16.

    Measured with ``bench/learner_step.py`` (README "Performance"): on CPUs without these
    units bf16 is emulated and gains little or loses.
    """
    if device.startswith("cuda"):
        return True
    return bool(bf16_flags())


def cpu_info() -> dict:
    """Recorded in every bench JSON: a figure is only comparable on the same kind of CPU."""
    return {
        "model": cpu_model(),
        "cores": os.cpu_count(),
        "bf16_flags": bf16_flags(),
        "avx512": sorted(f for f in cpu_flags() if f.startswith("avx512")),
        "machine": platform.machine(),
    }


def resolve_precision(precision: str, device: str) -> str:
    """``learner.precision`` as run: ``auto`` is bf16 where :func:`bf16_pays`, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_pays(device) else "fp32"
    return precision
