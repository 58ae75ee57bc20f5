"""Precision follows the CPU: bfloat16 only where it is native (torch's capability report on x86, a calibration
matmul elsewhere), an environment override, and `wspo fit` warning about bf16 on a CPU without it."""

from __future__ import annotations

import logging

import pytest
from helpers import fit, tiny_config

from wspo_lightning import hardware


@pytest.fixture
def cpu(monkeypatch):
    """Set what torch reports about the CPU (and the calibration's verdict) for one test."""

    def set_cpu(report: dict, calibration: bool = False, env: str | None = None) -> None:
        hardware.cpu_bf16_is_fast.cache_clear()
        monkeypatch.setattr(hardware, "_cpu_capabilities", lambda: report)
        monkeypatch.setattr(hardware, "_calibrate", lambda: calibration)
        if env is None:
            monkeypatch.delenv(hardware.ENV, raising=False)
        else:
            monkeypatch.setenv(hardware.ENV, env)

    yield set_cpu
    hardware.cpu_bf16_is_fast.cache_clear()


AVX2_LAPTOP = {"architecture": "x86_64", "cpu_name": "AMD EPYC", "avx2": True, "avx512_bf16": False, "amx_bf16": False}
AVX512_BF16 = {**AVX2_LAPTOP, "avx512_bf16": True}


def test_an_avx2_only_cpu_gets_float32_and_a_native_bf16_cpu_gets_bfloat16(cpu):
    cpu(AVX2_LAPTOP, calibration=True)  # x86: the report decides, not the calibration
    chosen = hardware.choose_precision("cpu")
    assert (chosen.dtype, chosen.trainer_precision) == ("float32", "32-true")
    cpu(AVX512_BF16, calibration=False)
    chosen = hardware.choose_precision("cpu")
    assert (chosen.dtype, chosen.trainer_precision) == ("bfloat16", "bf16-mixed")
    cpu({**AVX2_LAPTOP, "amx_bf16": True})
    assert hardware.choose_precision("cpu").dtype == "bfloat16"


def test_other_processors_are_calibrated_and_the_environment_overrides(cpu):
    cpu({"architecture": "aarch64"}, calibration=True)
    assert hardware.choose_precision("cpu").dtype == "bfloat16"
    cpu({"architecture": "aarch64"}, calibration=False)
    assert hardware.choose_precision("cpu").dtype == "float32"
    cpu(AVX512_BF16, env="float32")
    chosen = hardware.choose_precision("cpu")
    assert chosen.dtype == "float32" and hardware.ENV in chosen.reason
    cpu(AVX2_LAPTOP, env="bf16")
    assert hardware.choose_precision("cpu").dtype == "bfloat16"
    cpu(AVX2_LAPTOP, env="fast")  # not a value: ignored, and the reason is the CPU, not the variable
    chosen = hardware.choose_precision("cpu")
    assert chosen.dtype == "float32" and hardware.ENV not in chosen.reason and "AMD EPYC" in chosen.reason


def test_the_calibration_compares_real_matmuls():
    assert isinstance(hardware._calibrate(size=64, repeats=1), bool)


def test_fit_warns_when_a_config_asks_for_bf16_on_a_cpu_without_it(cpu, tiny_world, tmp_path, caplog):
    cpu(AVX2_LAPTOP)
    config = tiny_config(tiny_world, tmp_path)
    with caplog.at_level(logging.WARNING, logger="wspo_lightning.hardware"):
        fit(config, "--trainer.precision=bf16-mixed", "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    assert "trainer.precision=bf16-mixed on a CPU without native bfloat16" in caplog.text
    caplog.clear()
    cpu(AVX512_BF16)
    with caplog.at_level(logging.WARNING, logger="wspo_lightning.hardware"):
        fit(config, "--trainer.precision=bf16-mixed", "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    assert "without native bfloat16" not in caplog.text
