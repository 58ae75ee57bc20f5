"""Which device, and which precision it runs fast: bfloat16 only where the hardware does it natively.

On CPUs without bfloat16 instructions (AVX2-only x86, like many laptops) torch emulates bfloat16:
a matmul runs 10-60x slower than in float32. So CPU work uses bfloat16 only when torch's capability
report shows AVX-512 BF16 or AMX (x86), or, on other processors, when a short calibration matmul in
bfloat16 beats float32. `WSPO_CPU_PRECISION=bf16|float32` overrides the choice.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ENV = "WSPO_CPU_PRECISION"


# Values of WSPO_CPU_PRECISION (case-insensitive); any other value is ignored with a warning.
FORCE_BF16, FORCE_FP32 = ("bf16", "bfloat16"), ("fp32", "float32", "32")


def resolve_device(device: str | None = "auto") -> str:
    """ "auto" (or None) -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _cpu_capabilities() -> dict:
    report = getattr(torch._C._cpu, "_get_cpu_capability", None)  # torch >= 2.6
    try:
        return dict(report()) if report is not None else {}
    except Exception:  # an unusual platform: no report, calibrate instead
        return {}


def _calibrate(size: int = 384, repeats: int = 3) -> bool:
    """True when a [size x size] matmul runs faster in bfloat16 than in float32 on this CPU."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: kernel selection and allocation
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] < timings[torch.float32]


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU runs bfloat16 natively (see the module docstring); computed once per process."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in FORCE_BF16:
        return True
    if forced in FORCE_FP32:
        return False
    if forced:
        log.warning("%s=%r is not one of bf16, float32: ignored", ENV, forced)
    caps = _cpu_capabilities()
    if caps.get("architecture") in ("x86_64", "AMD64", "x86"):
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return _calibrate()


@dataclass(frozen=True)
class Precision:
    """The precision one device runs fast, for every stage of a run."""

    device: str
    """"cpu" or "cuda"."""
    dtype: str
    """Weights of frozen models (sampling, scoring, reference log-probs): "bfloat16" or "float32"."""
    trainer_precision: str
    """Lightning's `trainer.precision` for fits: "bf16-mixed" or "32-true"."""
    reason: str
    """Why, in words (for logs and reports)."""


def choose_precision(device: str | None = "auto") -> Precision:
    """bfloat16 where the device runs it natively (CUDA with bf16 support, or a CPU with AVX-512 BF16 / AMX),
    float32 elsewhere."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return Precision("cuda", "bfloat16", "bf16-mixed", f"{torch.cuda.get_device_name()} supports bfloat16")
        return Precision("cuda", "float32", "32-true", f"{torch.cuda.get_device_name()} lacks bfloat16")
    cpu = _cpu_capabilities().get("cpu_name") or "this CPU"
    forced = os.environ.get(ENV, "").strip()
    if forced.lower() not in FORCE_BF16 + FORCE_FP32:
        forced = ""  # an unknown value is ignored (cpu_bf16_is_fast warns), so it is not the reason either
    if cpu_bf16_is_fast():
        why = f"{ENV}={forced}" if forced else f"{cpu} runs bfloat16 natively"
        return Precision("cpu", "bfloat16", "bf16-mixed", why)
    why = f"{ENV}={forced}" if forced else f"{cpu} has no native bfloat16 (emulated 10-60x slower than float32)"
    return Precision("cpu", "float32", "32-true", why)


def warn_if_slow_bf16(precision: str | None, dtypes: dict[str, str]) -> None:
    """Warn when CPU work asks for bfloat16 on a CPU without it: `precision` is the trainer's, `dtypes` the
    ModelSpec dtype of each role."""
    if cpu_bf16_is_fast():
        return
    asked = [f"trainer.precision={precision}"] if precision and "bf16" in str(precision) else []
    asked += [f"{role}.dtype=bfloat16" for role, dtype in dtypes.items() if dtype == "bfloat16"]
    if not asked:
        return
    message = (
        f"{', '.join(asked)} on a CPU without native bfloat16: torch emulates it, 10-60x slower than "
        "float32. Use trainer.precision: 32-true and dtype: float32 here (or set "
        f"{ENV}=bf16 if you know better)."
    )
    log.warning(message)
