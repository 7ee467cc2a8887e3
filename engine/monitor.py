"""GPU monitoring through NVML (nvidia-ml-py), degrading to "unavailable" without it.

A sampler thread reads each watched GPU about once a second and keeps the latest
reading; callers (the ``stats`` op, metrics, ``recserve top``) read it without
touching NVML themselves. Any NVML failure (no library, no driver, no device, a
field the device does not support, MIG) becomes ``None`` fields or an
``available=False`` snapshot with the reason, never an exception.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU; a field is None when NVML cannot report it."""

    index: int
    name: str | None = None
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    sm_clock_mhz: int | None = None
    temperature_c: int | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class MonitorSnapshot:
    """The latest readings, or why there are none."""

    available: bool
    reason: str = ""
    time: float = 0.0
    gpus: tuple[GpuSample, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """Plain dict for msgpack and JSON."""
        return asdict(self)


def _read(fn, *args, scale: float = 1.0):
    """One NVML getter; None when this device or driver does not support it."""
    try:
        value = fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: report the field as missing
        return None
    return value * scale if scale != 1.0 else value


def sample_gpu(nvml, index: int) -> GpuSample:
    """Read every field of GPU ``index`` through the ``nvml`` module."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _read(nvml.nvmlDeviceGetName, handle)
    util = _read(nvml.nvmlDeviceGetUtilizationRates, handle)
    memory = _read(nvml.nvmlDeviceGetMemoryInfo, handle)
    pcie = getattr(nvml, "NVML_PCIE_UTIL_TX_BYTES", None)
    return GpuSample(
        index=index,
        name=name.decode() if isinstance(name, bytes) else name,
        utilization_pct=float(util.gpu) if util is not None else None,
        memory_used_bytes=int(memory.used) if memory is not None else None,
        memory_total_bytes=int(memory.total) if memory is not None else None,
        power_watts=_read(nvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
        power_limit_watts=_read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
        sm_clock_mhz=_read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        temperature_c=_read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        # NVML reports PCIe throughput in KB/s over a 20 ms window.
        pcie_tx_bytes_per_s=(_read(nvml.nvmlDeviceGetPcieThroughput, handle, pcie, scale=1e3)
                             if pcie is not None else None),
        pcie_rx_bytes_per_s=(_read(nvml.nvmlDeviceGetPcieThroughput, handle,
                                   nvml.NVML_PCIE_UTIL_RX_BYTES, scale=1e3)
                             if pcie is not None else None),
    )


class GpuMonitor:
    """Samples the given GPUs (all when None) every ``interval`` seconds on a daemon thread."""

    def __init__(self, devices: list[int] | None = None, interval: float = 1.0,
                 nvml=None) -> None:
        self.devices = devices
        self.interval = interval
        self._nvml = nvml
        self._snapshot = MonitorSnapshot(False, "not started")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpuMonitor:
        """Initialise NVML and start sampling; without NVML, record why and return."""
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            if self.devices is None:
                self.devices = list(range(self._nvml.nvmlDeviceGetCount()))
        except Exception as exc:  # no library, no driver, no permission: all mean "unavailable"
            self._snapshot = MonitorSnapshot(False, f"NVML unavailable: {exc}", time.time())
            return self
        if not self.devices:
            self._snapshot = MonitorSnapshot(False, "NVML sees no GPU", time.time())
            return self
        self.sample_now()
        self._thread = threading.Thread(target=self._loop, name="recserve-gpu-monitor",
                                        daemon=True)
        self._thread.start()
        return self

    def sample_now(self) -> MonitorSnapshot:
        """Take one reading of every watched GPU and keep it as the latest."""
        try:
            gpus = tuple(sample_gpu(self._nvml, i) for i in self.devices or [])
            self._snapshot = MonitorSnapshot(True, "", time.time(), gpus)
        except Exception as exc:  # e.g. the GPU fell off the bus: report, keep serving
            self._snapshot = MonitorSnapshot(False, f"NVML read failed: {exc}", time.time())
        return self._snapshot

    def snapshot(self) -> MonitorSnapshot:
        """The latest reading (cheap; no NVML call)."""
        return self._snapshot

    def stop(self) -> None:
        """Stop sampling and release NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down anyway
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_now()
