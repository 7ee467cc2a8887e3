"""GPU monitor: real NVML absent here reports unavailable; a fake NVML drives the fields."""

import types

from recserve.engine.monitor import GpuMonitor


def fake_nvml(fail_power: bool = False, fail_all: bool = False):
    class NotSupported(Exception):
        pass

    def power(handle):
        if fail_power:
            raise NotSupported("power not supported")
        return 412_345  # milliwatts

    def handle(index):
        if fail_all:
            raise RuntimeError("GPU is lost")
        return f"h{index}"

    return types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=5 << 30, total=141 << 30),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetClockInfo=lambda h, kind: 1980,
        nvmlDeviceGetTemperature=lambda h, kind: 51,
        nvmlDeviceGetPcieThroughput=lambda h, kind: 1_000 if kind == "tx" else 2_000,
        NVML_CLOCK_SM="sm", NVML_TEMPERATURE_GPU="gpu",
        NVML_PCIE_UTIL_TX_BYTES="tx", NVML_PCIE_UTIL_RX_BYTES="rx",
    )


def test_without_nvml_the_monitor_is_unavailable_not_an_error():
    def broken_init():
        raise OSError("NVML Shared Library Not Found")

    nvml = types.SimpleNamespace(nvmlInit=broken_init)
    monitor = GpuMonitor(nvml=nvml).start()
    snap = monitor.snapshot()
    assert not snap.available and "NVML Shared Library Not Found" in snap.reason
    assert snap.to_dict()["gpus"] == ()
    monitor.stop()


def test_fake_nvml_readings_and_unsupported_fields():
    monitor = GpuMonitor(nvml=fake_nvml(fail_power=True), interval=60).start()
    snap = monitor.snapshot()
    monitor.stop()
    assert snap.available and [g.index for g in snap.gpus] == [0, 1]
    gpu = snap.gpus[0]
    assert gpu.name == "NVIDIA H200" and gpu.utilization_pct == 87.0
    assert (gpu.memory_used_bytes, gpu.memory_total_bytes) == (5 << 30, 141 << 30)
    assert gpu.power_watts is None and gpu.power_limit_watts == 700.0
    assert (gpu.sm_clock_mhz, gpu.temperature_c) == (1980, 51)
    assert (gpu.pcie_tx_bytes_per_s, gpu.pcie_rx_bytes_per_s) == (1e6, 2e6)


def test_a_failing_read_is_reported_and_sampling_goes_on():
    nvml = fake_nvml()
    monitor = GpuMonitor(devices=[0], nvml=nvml, interval=60).start()
    assert monitor.snapshot().available
    nvml.nvmlDeviceGetHandleByIndex = lambda i: (_ for _ in ()).throw(RuntimeError("lost"))
    snap = monitor.sample_now()
    monitor.stop()
    assert not snap.available and "lost" in snap.reason


def test_real_nvml_on_this_machine_never_raises():
    monitor = GpuMonitor(interval=60).start()
    snap = monitor.snapshot()
    monitor.stop()
    assert snap.available == bool(snap.gpus)
    assert snap.available or snap.reason
