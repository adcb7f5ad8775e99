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

# The learner actor's malloc settings (it runs with these env vars; bench/learner_step.py too).
# glibc returns large freed blocks to the OS at once, so every learner step page-faults
# its (B·tiles, 256) activations in afresh. Keeping them costs a few hundred MB and makes
# a generator step about 1.5x faster on CPU (measured; see docs/benchmarks.md "Learner").
LEARNER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


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

    Measured with ``bench/learner_step.py`` (docs/benchmarks.md "Learner"): on CPUs without these
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


# Below this many policy parameters the learner's products are too small for bf16 to win on
# a CPU: the casts cost more than the arithmetic saves. Measured with bench/learner_step.py
# on Hopper-v5 (2 threads, AMX CPU), s/episode fp32 vs bf16: policy [32, 32] (1.6k params)
# 0.22 vs 0.30, [64, 64] (5.8k) 0.28 vs 0.28, [128, 128] (18k) 0.44 vs 0.36, [256, 256]
# (70k) 1.2 vs 0.72.
BF16_MIN_POLICY_PARAMS = 10_000


def resolve_precision(precision: str, device: str, policy_params: int | None = None) -> str:
    """``learner.precision`` as run. ``auto``: bf16 on a GPU, and on a CPU with bf16 units
    (:func:`bf16_pays`) for policies of at least ``BF16_MIN_POLICY_PARAMS`` weights; else fp32."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16"
    big = policy_params is None or policy_params >= BF16_MIN_POLICY_PARAMS
    return "bf16" if bf16_pays(device) and big else "fp32"
