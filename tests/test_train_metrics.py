"""GPU telemetry degrades quietly without a GPU and reads NVML when it is there."""
import sys
import types

import pytest
import torch

from vittle_fast.train.metrics import GpuTelemetry


def test_telemetry_is_silent_without_nvml_library():
    """On this GPU-less machine nvidia-ml-py is installed but its library is not: no error, no metrics."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pytest.skip("an NVML library is present on this machine")
    assert GpuTelemetry(torch.device("cuda", 0)).read() == {}


def test_telemetry_is_off_for_cpu_devices():
    assert GpuTelemetry(torch.device("cpu")).read() == {}


def test_telemetry_reads_utilisation_memory_and_power(monkeypatch):
    """With an NVML that answers (a stand-in module), the three readings come out in the stated units."""
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=12_500_000_000),
        nvmlDeviceGetPowerUsage=lambda handle: 312_000,  # milliwatts
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert GpuTelemetry(torch.device("cuda", 1)).read() == {
        "gpu_util_pct": 87.0, "gpu_mem_used_gb": 12.5, "gpu_power_w": 312.0,
    }
